"""dynboot: bootstrap visual world models (FDP) from dynamics models (IDP) in unified VLMs, on Ray."""

__version__ = "0.1.0"
