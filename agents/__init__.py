"""RL glue: SB3 VecEnv adapter, feature extractors, training/evaluating agents; the CLI."""
