"""Neural network parts: DINOv2 encoder, ALPNet prototype matching, SAM refinement."""
