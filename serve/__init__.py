"""The best-of-N Ray Serve application: Generator (FDP) and Verifier (IDP) tiers behind an HTTP ingress."""
