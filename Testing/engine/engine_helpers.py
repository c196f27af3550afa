"""Small synthetic inputs shared by the engine tests."""
import numpy as np


def blob_slice(size: int = 64, center=(32, 32), radius: int = 10, seed: int = 0):
    """A noisy 2-D slice with a bright disc -> (image float32 [H, W], mask uint8 [H, W])."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = ((yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2).astype(np.uint8)
    image = (rng.normal(0, 0.3, (size, size)) + 2.0 * mask).astype(np.float32)
    return image, mask
