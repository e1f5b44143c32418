"""Order control: the 1-process GPTQ build with the calibration rows in another order (reversed, or the two
halves a 2-rank run would take, each summed apart then added: not possible in one oneshot; reversed is used)."""
import sys

from quantkit.context import BuildContext

orig = BuildContext.oneshot_calibration_kwargs


def reordered(self, rows=None):
    kw = orig(self, rows)
    ds = kw["dataset"]
    kw["dataset"] = ds.select(list(range(len(ds)))[::-1])
    print("calibration rows reversed", len(ds), file=sys.stderr, flush=True)
    return kw


BuildContext.oneshot_calibration_kwargs = reordered
from quantkit.cli import main  # noqa: E402

main(sys.argv[1:])
