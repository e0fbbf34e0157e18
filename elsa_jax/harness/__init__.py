# Copyright 2026 The elsa_jax Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
# ==============================================================================
"""Zero-shot evaluation through lm-evaluation-harness, on the elsa_jax model in JAX.

Importing this package registers :class:`~elsa_jax.harness.lm.ElsaLM` with
lm-eval as ``elsa_jax``, so lm-eval's task machinery works unchanged::

    import lm_eval
    import elsa_jax.harness

    lm_eval.simple_evaluate(model="elsa_jax", model_args="pretrained=runs/elsa/model",
                            tasks=["boolq", "rte"], num_fewshot=0)

It needs the optional extra ``pip install elsa_jax[eval]`` (lm-eval); the
rest of elsa_jax imports without it.
"""

try:
  import lm_eval  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
  raise ImportError("elsa_jax.harness needs lm-evaluation-harness: pip install 'elsa_jax[eval]' "
                    "(or pip install lm-eval).") from err

from elsa_jax.harness import scoring
from elsa_jax.harness import zero_shot
from elsa_jax.harness.lm import NAME, ElsaLM
from elsa_jax.harness.zero_shot import evaluate, results_table, task_scores

__all__ = ["NAME", "ElsaLM", "evaluate", "results_table", "scoring", "task_scores", "zero_shot"]
