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
"""The elsa_jax model as an lm-eval ``LM``, registered as ``elsa_jax``.

:class:`ElsaLM` follows lm-eval's own ``hf`` backend request by request: the
same tokenisation (:meth:`tok_encode`, BOS handling, the prefix token of an
empty context), the same left truncation to ``max_length``, the same rolling
windows for ``loglikelihood_rolling`` and the same stop sequences and
post-processing for ``generate_until``, so that a task scores the same on both
backends. Only the model runs in JAX: :class:`elsa_jax.harness.scoring.Scorer`
(batched, bucketed, sharded) and :func:`elsa_jax.models.generate.greedy`
(greedy decoding with a KV cache).

``model_args`` of ``lm_eval.simple_evaluate(model="elsa_jax", model_args=...)``:
``pretrained`` ('default', a ``.gguf`` file, an HF directory or hub id),
``batch_size``, ``max_length``, ``max_gen_toks``, ``dtype`` ('float32' |
'bfloat16'), ``mesh`` (``DATAxMODEL``, e.g. ``4x2``), ``add_bos_token``,
``prefix_token_id``.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models import utils as model_utils
from tqdm.auto import tqdm

from elsa_jax.harness import scoring
from elsa_jax.models import generate
from elsa_jax.run import loading
from elsa_jax.run import sharding as sharding_lib

logger = logging.getLogger(__name__)

#: The registered model name.
NAME = "elsa_jax"
DEFAULT_BATCH_SIZE = 8


def _mesh(spec: str | tuple[int, int] | jax.sharding.Mesh | None) -> jax.sharding.Mesh | None:
  """A mesh from ``"DATAxMODEL"`` or ``(data, model)`` (None: one device, nothing placed)."""
  if spec is None or isinstance(spec, jax.sharding.Mesh):
    return spec
  if isinstance(spec, str):
    try:
      data, model = (int(x) for x in spec.lower().split("x"))
    except ValueError:
      raise ValueError(f"mesh takes DATAxMODEL such as 4x2 or -1x1, got {spec!r}.") from None
  else:
    data, model = spec
  return sharding_lib.make_mesh(data, model)


def _batch_size(value: Any) -> int:
  """lm-eval's ``batch_size`` (an int, or 'auto', which JAX's fixed shapes do not need) as an int."""
  if value is None or str(value).startswith("auto"):
    return DEFAULT_BATCH_SIZE
  return int(value)


@register_model(NAME)
class ElsaLM(TemplateLM):
  """An lm-eval model backed by an elsa_jax model of any registered architecture.

  Args:
    pretrained: What :func:`elsa_jax.run.loading.load_model` loads; ignored when ``model`` is given.
    model: An already loaded model (e.g. a pruned one); its ``params`` unless ``params`` is given.
    params: Parameters to evaluate instead of ``model.params``.
    batch_size: Rows per compiled batch (loglikelihood windows and generated sequences).
    max_length: The longest input; None: the model config's (as lm-eval's ``resolve_max_length``).
    max_gen_toks: Default generation budget of ``generate_until``.
    dtype: Compute dtype of the parameters.
    mesh: ``"DATAxMODEL"`` (or a Mesh) to shard the parameters and batches over a device mesh; None: one
      device.
    add_bos_token: Force (True/False) the tokenizer's special tokens, as the ``hf`` backend's flag.
    prefix_token_id: The token an empty context is replaced by (default: BOS, else EOS).
    **kwargs: lm-eval's generic arguments (``device``, ``max_batch_size``), which do not apply here.
  """

  backend = "causal"

  def __init__(self, pretrained: str = loading.DEFAULT_MODEL, *, model: loading.LoadedModel | None = None,
               params: Any = None, batch_size: int | str | None = DEFAULT_BATCH_SIZE,
               max_length: int | None = None, max_gen_toks: int = 256, dtype: str = "float32",
               mesh: str | tuple[int, int] | jax.sharding.Mesh | None = None, add_bos_token: bool | None = None,
               prefix_token_id: int | None = None, **kwargs: Any):
    super().__init__()
    ignored = {k: v for k, v in kwargs.items() if v is not None}
    if ignored:
      logger.info("elsa_jax ignores %s (JAX places the model on its own devices; batches have fixed shapes)",
                  ignored)
    self.mesh = _mesh(mesh)
    self.loaded = model if model is not None else loading.load_model(str(pretrained))
    self.tokenizer = self.loaded.tokenizer
    self.add_bos_token = add_bos_token
    self.custom_prefix_token_id = prefix_token_id
    self._max_length = int(max_length) if max_length else model_utils.resolve_max_length(
        self.loaded.config, self.tokenizer)
    self._max_gen_toks = int(max_gen_toks)
    compute = jnp.dtype(dtype)
    params = self.loaded.params if params is None else params
    params = jax.tree.map(lambda p: p.astype(compute), params)
    self.scorer = scoring.Scorer(self.loaded.graphdef, params, mesh=self.mesh, batch_size=_batch_size(batch_size),
                                 max_length=self._max_length)
    self._rank, self._world_size = 0, 1

  # ------------------------------------------------------------------ what lm-eval reads
  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    if self.custom_prefix_token_id is not None:
      return self.custom_prefix_token_id
    if self.tokenizer.bos_token_id is not None:
      return self.tokenizer.bos_token_id
    return self.tokenizer.eos_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self.scorer.batch_size

  @property
  def tokenizer_name(self) -> str:
    return str(getattr(self.tokenizer, "name_or_path", NAME)).replace("/", "__")

  def _special_tokens(self, string: str, add_special_tokens: bool | None) -> dict[str, bool]:
    """The ``add_special_tokens`` the ``hf`` backend passes for ``string`` (none to leave the default)."""
    if add_special_tokens is not None:
      return {"add_special_tokens": add_special_tokens}
    if model_utils.has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
      return {"add_special_tokens": False}
    return {} if self.add_bos_token is None else {"add_special_tokens": self.add_bos_token}

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                 **kwargs: Any) -> list[int]:
    encoding = self.tokenizer.encode(string, **self._special_tokens(string, add_special_tokens))
    return encoding[-left_truncate_len:] if left_truncate_len else encoding

  def tok_decode(self, tokens: Any, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  # ------------------------------------------------------------------ requests
  def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any
                            ) -> list[tuple[float, bool]]:
    """``requests``: ``(request strings or None, context ids, continuation ids)``, as TemplateLM builds them."""
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
    results = self.scorer.loglikelihoods([(ctx, cont) for _, ctx, cont in requests], pad_id=self._pad_id,
                                         progress=bar.update)
    bar.close()
    for (request, _, _), answer in zip(requests, results):
      if request is not None:
        self.cache_hook.add_partial("loglikelihood", request, answer)
    return results

  def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
    """The log-likelihood of whole texts, in disjoint ``max_length`` windows (lm-eval's rolling windows)."""
    windows, owners = [], []
    for i, (string,) in enumerate(req.args for req in requests):
      for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
          context_len=1)):
        windows.append((None, context, continuation))
        owners.append(i)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owners, scores):
      totals[i] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
    """Greedy continuations, cut at the request's stop sequences (and EOS), as the ``hf`` backend does."""
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
    collator = model_utils.Collator([req.args for req in requests],
                                    sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
                                    group_by="gen_kwargs", group_fn=lambda args: args[1])
    out = []
    for chunk in collator.get_batched(n=self.batch_size):
      contexts, all_kwargs = zip(*chunk)
      for context, text in zip(contexts, self._generate(list(contexts), all_kwargs[0])):
        out.append(text)
        self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
        bar.update(1)
    bar.close()
    return collator.get_original(out)

  def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
    """One batch of ``generate_until``: the same context truncation, stop sequences and post-processing as hf."""
    kwargs = model_utils.normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
    eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
    until = model_utils.handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
    max_gen_toks = kwargs.pop("max_gen_toks")
    if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0.0:
      raise ValueError(f"elsa_jax decodes greedily only; this task asks for sampling ({gen_kwargs}).")
    max_ctx_len = self.max_length - max_gen_toks
    if max_ctx_len < 1:
      raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a context in max_length={self.max_length}.")
    special = self._special_tokens(contexts[0], None)  # the hf backend decides once per batch
    prompts = [self.tokenizer.encode(c, **special)[-max_ctx_len:] for c in contexts]

    def stop(_row: int, tokens: list[int]) -> bool:
      text = self.tok_decode(tokens, skip_special_tokens=False)
      return any(s and s in text for s in until)

    generated = generate.greedy(self.loaded.graphdef, self.scorer.params, prompts, max_new_tokens=max_gen_toks,
                                eos_ids=self._eos_ids, stop=stop, batch_size=self.batch_size, pad_id=self._pad_id,
                                place=self.scorer.place)
    return [model_utils.postprocess_generated_text(self.tok_decode(tokens), stop=until, think_end_token=None)
            for tokens in generated]

  @property
  def _pad_id(self) -> int:
    pad = self.tokenizer.pad_token_id
    return pad if pad is not None else (self.tokenizer.eos_token_id or 0)

  @property
  def _eos_ids(self) -> set[int]:
    """Where a generated row ends: the tokenizer's EOS and the model config's (transformers stops at the latter)."""
    config_eos = getattr(self.loaded.config, "eos_token_id", None)
    ids = set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
    return {i for i in ids | {self.tokenizer.eos_token_id} if i is not None}
