"""Scaling laws (paper section 3.2.1): IsoFLOP sweeps, compute-optimal fits, downstream
forecasts, data-mix selection and annealing probes.

One module per job:

* ``plan``         budgets x model sizes -> runs (tokens, steps, schedule) from a YAML config
* ``sweep``        trains the runs one after another, records each, skips finished ones
* ``isoflop``      parabolas per budget, the power law over their minima, bootstrap CIs
* ``downstream``   a multiple-choice benchmark, NLL of the right answer, the sigmoid to accuracy
* ``mix``          per-mix loss-vs-compute power laws, ranked at a larger budget
* ``anneal_probe`` anneal a checkpoint with and without a candidate domain, compare scores
* ``plots``        PNG figures and TensorBoard images/scalars
* ``cli``          ``recipe scaling sweep|fit|forecast|mix|anneal-probe``

The fitting modules need numpy only; training pulls in the recipe's Lightning pieces
lazily, so fitting a results table from a cluster sweep stays cheap.
"""

from recipe.errors import RecipeError


class ScalingError(RecipeError):
    """A sweep table or fit request that cannot give a meaningful answer."""


__all__ = ["ScalingError"]
