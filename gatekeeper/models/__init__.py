"""models/: a gatekeeper model folder -> PromptTunedCLIP."""
