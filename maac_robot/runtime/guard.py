"""The uncertainty guard's measure: how much the ensemble's elite members disagree about the next state.

One definition, used by the export (to calibrate the manifest's `guard.threshold` on the run's own
transitions) and by the controller (every control period, on `ensemble.onnx`'s outputs), so the number
the controller compares is the number the threshold was computed from:

    disagreement(s, a) = mean over state dims d of  std_e( next_state_mean[e, d] ) / scale[d]

where e runs over the elite members (`manifest.elites`; population std, ddof 0) and `scale[d]` is the
standard deviation of the next-state change Δs_d in the data the ensemble was fitted on (its output
normaliser; 1 for dims it carries over unchanged). So 0.1 reads "the elites' predicted next states are
on average a tenth of a typical one-step change apart". The std across members is the ensemble's
epistemic uncertainty (what more data would reduce); each member's own predicted variance
(`next_state_logvar`, aleatoric) does not enter. Torch-free: a robot computer runs it.
"""

from __future__ import annotations

import numpy as np

DEFINITION = ("mean over state dims d of std over the elite members e (ddof 0) of next_state_mean[e, d], "
              "divided by scale[d] (the std of the next-state change in the ensemble's training data)")
"""Written into the manifest's `guard.definition`: a controller whose DEFINITION differs disables the guard."""


def disagreement(means: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The disagreement [B] of elite predictions `means` [E, B, S] (or [E, S] -> a scalar array) given `scale` [S].

    E >= 2 members are needed for a spread; `scale` must be positive. NaN/inf in `means` give NaN/inf.
    """
    means = np.asarray(means, np.float64)
    scale = np.asarray(scale, np.float64)
    if means.ndim not in (2, 3) or means.shape[0] < 2:
        raise ValueError(f"disagreement needs the predictions of >= 2 members, [E, B, S] or [E, S]; got shape "
                         f"{means.shape}")
    if scale.shape != means.shape[-1:] or not (scale > 0).all():
        raise ValueError(f"scale must hold {means.shape[-1]} positive values (one per state dim), got "
                         f"{scale.tolist()}")
    # = (means.std(axis=0) / scale).mean(axis=-1), without np.std's overhead (every control period calls this)
    dev = means - means.sum(axis=0) / len(means)
    return np.sqrt(np.einsum("e...s,e...s->...s", dev, dev) / len(means)) @ (1.0 / scale) / len(scale)
