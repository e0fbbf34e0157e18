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
"""The errors a user can fix: each names the flag or file, the problem and the fix.

Every layer raises these (or the standard ``ValueError`` / ``OSError`` family)
for bad input; the command line (:mod:`elsa_jax.cli.commands`) prints the
message of any of them on stderr and exits 2, with no traceback. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
  """Input that cannot be used as given: the message says which, why, and what fixes it."""


class InputError(UserError, ValueError):
  """A file or value that cannot be read or used (a damaged file, a malformed record, a bad option)."""


class MissingFieldError(UserError, KeyError):
  """A record or dataset without the field that holds the text (``--text-field``)."""

  def __str__(self) -> str:  # KeyError would quote the whole message
    return str(self.args[0]) if self.args else ""
