"""Fast-weight mechanisms as plain torch math (FWL heads, in-place TTT) and their slow references."""
