"""Moving to fleet mode: a policy file written in single-Envoy mode, imported into etcd, and the
token minted there (its secret never re-issued) served by a fleet Envoy with the real key."""

from __future__ import annotations

import json
import time

from deployment import error_code, request
from fleet import Fleet


def test_a_token_minted_on_file_is_served_by_the_fleet_after_import(tmp_path, mock_mistral, mock_keys):
    fleet = Fleet(tmp_path / "fleet", mock_mistral, {}, etcd_members=1, envoys=1, concurrency=1)
    try:
        policy = tmp_path / "policy.json"
        on_file = {"SHIELDKEY_ETCD": "", "SHIELDKEY_POLICY": str(policy)}
        fleet.cli("init", env_extra=on_file)
        fleet.cli("seal", "--id", "prod", stdin=mock_keys["prod"], env_extra=on_file)
        token = fleet.cli("mint", "--id", "moved", "--upstream-key", "prod", "--owner", "ops",
                          env_extra=on_file).strip()
        gone = fleet.cli("mint", "--id", "gone", "--upstream-key", "prod", env_extra=on_file).strip()
        fleet.cli("revoke", "gone", env_extra=on_file)

        # etcd already holds the fleet's empty policy: replacing it takes --force.
        fleet.cli("import", str(policy), check=False)
        assert fleet.last.returncode == 1 and "--force" in fleet.last.stderr
        fleet.cli("import", str(policy), "--force")
        fleet.start()

        deadline = time.monotonic() + 10
        while True:  # the syncer reads the policy from etcd after Envoy starts
            status, _, body = request(fleet.url(0), token=token)
            if status != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 200, body
        seen = mock_mistral.requests()
        assert seen[-1]["headers"]["authorization"] == f"Bearer {mock_keys['prod']}"
        assert all(token not in json.dumps(r) for r in seen)
        # The token revoked on file is revoked in the fleet.
        gone_status, _, gone_body = request(fleet.url(0), token=gone)
        assert (gone_status, error_code(gone_body)) == (401, "shield_token_revoked")
    finally:
        fleet.close()
