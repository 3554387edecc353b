"""Training-aware pruning methods, which plug into the fine-tuning loop: soft pruning and EDP."""
