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
"""Opening a GGUF file, with a message that names a missing, truncated or damaged one.

Example::

  reader = gguf_file.open_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # a gguf.GGUFReader
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from elsa_jax.errors import InputError


def open_gguf(path: str | os.PathLike) -> Any:
  """A ``gguf.GGUFReader`` of ``path`` (its tensors are memory-mapped, not read).

  Raises:
    FileNotFoundError: ``path`` is not a file.
    elsa_jax.errors.InputError: the file is not a whole GGUF file (truncated by an interrupted download, or damaged).
  """
  import gguf

  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no such GGUF file: {str(path)!r}; check the --model path.")
  try:
    return gguf.GGUFReader(path)
  except Exception as err:  # gguf raises ValueError, struct.error, IndexError... on a short or damaged file
    raise InputError(
        f"{path} is not a complete GGUF file ({type(err).__name__}: {err}); it is truncated or damaged: "
        f"re-download it (the built-in model's copy in the elsa_jax cache: delete it and run again) or pass "
        f"another --model.") from None
