"""Ray jobs: `python -m jobs.<name>` is what `dynboot <name>` and `ray job submit` run."""
