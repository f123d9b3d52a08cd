"""Schemathesis hooks for `scripts/fuzz-api.sh` (loaded via SCHEMATHESIS_HOOKS).

Schemathesis reuses values it saw in responses (a user's `id` from `GET /me`,
a token's `id` from `GET /admin/users/{id}/tokens`) as path parameters. In
the admin run that would let it revoke the fuzzing admin's own token, demote
or deactivate it (allowed once the fuzzer has created another admin), or
give it a tiny request quota: every later request of the run would then get
401 or 429 and test nothing. So the operations that can do that never
receive one of the ids in NOX_FUZZ_PROTECTED_IDS (the fuzzing admin's user
id and token ids): such a case gets a fresh random UUID instead (a 404).
Every other id, and every other operation, is fuzzed as generated.
"""

import atexit
import os
import sys
import uuid

import schemathesis

PROTECTED = {
    value.strip().lower()
    for value in os.environ.get("NOX_FUZZ_PROTECTED_IDS", "").split(",")
    if value.strip()
}

# (method, path template) of the operations that can lock the caller out.
GUARDED = {
    ("DELETE", "/admin/tokens/{id}"),
    ("PATCH", "/admin/users/{id}"),
    ("PUT", "/quotas/admin/users/{id}/quotas"),
}


replaced = 0


@atexit.register
def _report():
    if PROTECTED:
        print(f"nox_fuzz_hooks: {replaced} cases aimed at the fuzzing admin got a random id", file=sys.stderr)


@schemathesis.hook
def before_call(context, case, **kwargs):
    global replaced
    if (case.method.upper(), case.path) not in GUARDED or not case.path_parameters:
        return
    value = case.path_parameters.get("id")
    if isinstance(value, str) and value.strip().lower() in PROTECTED:
        case.path_parameters["id"] = str(uuid.uuid4())
        replaced += 1
