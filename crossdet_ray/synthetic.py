"""The synthetic generator's old name: it lives in `crossdet_ray.data.synthetic` now. Kept so
that imports and `python -m crossdet_ray.synthetic` written before the move still work."""

import sys
import warnings

from crossdet_ray.data.synthetic import *  # noqa: F401,F403 - the module's names, unchanged
from crossdet_ray.data.synthetic import generate_dataset, main  # noqa: F401 - named explicitly

warnings.warn("crossdet_ray.synthetic moved to crossdet_ray.data.synthetic", DeprecationWarning,
              stacklevel=2)

if __name__ == "__main__":
    sys.exit(main())
