import os

# Two-thread MKL is pathological on the 2-core CI machines; tests use one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
