"""Training algorithms: objectives (what a batch means to each loss family), LoRA, and the jitted step."""
