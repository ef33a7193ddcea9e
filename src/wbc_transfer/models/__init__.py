"""Models: the architecture registry (name -> builder, per-architecture facts), the ImageNet weight
files and the input adapters (stain layer, frozen BatchNorm)."""
