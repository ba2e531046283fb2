"""Update hygiene, Byzantine behaviours, checkpoints, certificates and deployment commands."""

from __future__ import annotations

import numpy as np
import pytest

from components.errors import ConfigError, DataError
from components.federated.attacks import attacker_sites, poison_labels, poison_update
from components.federated.checkpoint import CheckpointStore, read_ledger, write_ledger
from components.federated.hygiene import screen_updates, update_norm
from components.federated.settings import AttackSettings, HygieneSettings

REF = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32), "n": np.array(5, np.int64)}


def weights(delta: float, **changes) -> dict[str, np.ndarray]:
    out = {"w": REF["w"] + delta, "b": REF["b"] + delta, "n": REF["n"] + 1}
    return out | changes


def test_update_norm_ignores_integer_buffers():
    assert update_norm(weights(1.0), REF) == pytest.approx(3.0)  # sqrt(9 entries × 1²)


def test_hygiene_rejects_malformed_and_absurd_updates_and_keeps_the_rest():
    updates = [
        ("site-1", 1, weights(0.10)),
        ("site-2", 2, weights(0.12)),
        ("site-3", 3, weights(0.11)),
        ("site-4", 4, weights(0.10, w=np.full((2, 3), np.nan, np.float32))),
        ("site-5", 5, weights(0.10, b=np.zeros(4, np.float32))),
        ("site-6", 6, {"w": REF["w"], "b": REF["b"]}),
        ("site-7", 7, weights(100.0)),
    ]
    accepted, rejections, norms = screen_updates(
        3, updates, REF, HygieneSettings(max_norm_ratio=50)
    )
    assert accepted == [0, 1, 2]
    reasons = {r.site: r.reason for r in rejections}
    assert set(reasons) == {"site-4", "site-5", "site-6", "site-7"}
    assert "non-finite" in reasons["site-4"] and "w" in reasons["site-4"]
    assert "wrong shape for b: (4,)" in reasons["site-5"]
    assert "missing n" in reasons["site-6"]
    assert "x the round's median" in reasons["site-7"]
    assert all(r.round == 3 for r in rejections)
    assert set(norms) == {"site-1", "site-2", "site-3", "site-7"}


def test_sign_flip_x10_passes_hygiene_but_an_absolute_cap_stops_it():
    updates = [(f"s{i}", i, weights(0.1 + 0.01 * i)) for i in range(4)]
    flipped = poison_update(weights(0.1), REF, {"behaviour": "sign_flip", "scale": 10.0}, None)
    updates.append(("evil", 9, flipped))
    accepted, _, _ = screen_updates(1, updates, REF, HygieneSettings())
    assert 4 in accepted  # 10x the median norm is not "absurd" at the default 50x
    accepted, rejections, _ = screen_updates(1, updates, REF, HygieneSettings(max_norm=1.0))
    assert 4 not in accepted and rejections[0].site == "evil"


def test_poisoned_updates():
    local, rng = weights(0.5), np.random.default_rng(0)
    flip = poison_update(local, REF, {"behaviour": "sign_flip", "scale": 10.0}, rng)
    np.testing.assert_allclose(flip["w"], -5.0)
    assert flip["n"] == local["n"]  # integer buffers untouched
    scaled = poison_update(local, REF, {"behaviour": "scale", "scale": 3.0}, rng)
    np.testing.assert_allclose(scaled["b"], 1.5)
    noisy = poison_update(local, REF, {"behaviour": "gaussian", "noise_std": 1.0}, rng)
    assert not np.allclose(noisy["w"], local["w"]) and noisy["w"].dtype == np.float32
    nan = poison_update(local, REF, {"behaviour": "nan"}, rng)
    assert np.isnan(nan["w"]).all()
    same = poison_update(local, REF, {"behaviour": "label_flip"}, rng)
    np.testing.assert_array_equal(same["w"], local["w"])
    np.testing.assert_array_equal(poison_labels(np.array([0, 1, 2]), 3), [2, 1, 0])


def test_attacker_sites():
    sites = ["site-3", "site-1", "site-2"]
    assert attacker_sites(AttackSettings(), sites) == {}
    chosen = attacker_sites(AttackSettings(behaviour="sign_flip", sites=2), sites)
    assert sorted(chosen) == ["site-1", "site-2"] and chosen["site-1"]["scale"] == 10.0
    named = attacker_sites(AttackSettings(behaviour="nan", sites=("site-3",)), sites)
    assert list(named) == ["site-3"]
    with pytest.raises(ConfigError, match="unknown site"):
        attacker_sites(AttackSettings(behaviour="nan", sites=("site-9",)), sites)


def test_checkpoints_are_atomic_pruned_and_tied_to_their_settings(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", fingerprint="abc", keep=2)
    assert store.latest() is None
    for r in (1, 2, 3):
        store.save(r, weights(float(r)), {"history": [{"round": i} for i in range(1, r + 1)]})
    latest = store.latest()
    assert latest.round == 3 and latest.state["history"][-1] == {"round": 3}
    np.testing.assert_allclose(latest.arrays["w"], 3.0)
    assert latest.arrays["n"].dtype == np.int64 and latest.arrays["n"].shape == ()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["round-0002", "round-0003"]
    # a half-written checkpoint (no state.json) is ignored
    (tmp_path / "ckpt" / "round-0004").mkdir()
    assert store.latest().round == 3
    with pytest.raises(ConfigError, match="different federation settings"):
        CheckpointStore(tmp_path / "ckpt", fingerprint="other").latest()
    write_ledger(tmp_path / "ledger.jsonl", [{"round": 1, "x": np.float32(0.5)}])
    write_ledger(tmp_path / "ledger.jsonl", [{"round": 1}, {"round": 2}])
    assert [row["round"] for row in read_ledger(tmp_path / "ledger.jsonl")] == [1, 2]


def test_certificates_and_supernode_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from components.federated.certs import make_certificates, make_supernode_keys

    paths = make_certificates(tmp_path / "certs")
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    assert server.issuer == ca.subject
    ca.public_key().verify(
        server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm)
    )
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert oct(paths.server_key.stat().st_mode & 0o777) == "0o600"
    keys = make_supernode_keys(tmp_path / "keys", ["site-1", "site 2"])
    private = serialization.load_ssh_private_key(keys["site 2"].private_key.read_bytes(), None)
    public = serialization.load_ssh_public_key(keys["site 2"].public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(public.curve, ec.SECP384R1)
    assert keys["site 2"].private_key.name == "site-2.key"


def test_deployment_commands(tmp_path):
    from components.federated.certs import CertPaths
    from components.federated.deployment import superlink_command, supernode_command, write_app
    from components.federated.task import write_site

    certs = CertPaths(tmp_path / "ca.crt", tmp_path / "s.pem", tmp_path / "s.key")
    link = superlink_command(port=9100, certs=certs, supernode_auth=True)
    assert "--disable-runtime-dependency-installation" in link
    assert link[link.index("--ssl-certfile") + 1] == str(tmp_path / "s.pem")
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    with pytest.raises(ConfigError, match="TLS certificates"):
        superlink_command(port=9100)
    assert "--insecure" in superlink_command(port=9100, insecure=True)

    with pytest.raises(DataError, match="no site data in"):
        supernode_command(tmp_path / "nowhere", superlink="127.0.0.1:9100", insecure=True)
    x = np.zeros((2, 3, 8, 8), np.uint8)
    site = write_site(tmp_path / "site-1", "site-1", (x, np.array([0, 1])), (x[:1], np.array([0])))
    node = supernode_command(site, superlink="127.0.0.1:9100", root_cert=certs.ca_cert, port=9200)
    assert node[node.index("--node-config") + 1] == f'data-dir="{site.resolve()}"'
    assert node[node.index("--root-certificates") + 1] == str(certs.ca_cert)
    assert "--allow-runtime-dependency-installation" not in node

    import tomllib

    app = write_app(tmp_path / "oncoflow-app", tmp_path / "spec.json")
    meta = tomllib.loads((app / "pyproject.toml").read_text())
    assert meta["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "components.federated.server_app:app",
        "clientapp": "components.federated.client_app:app",
    }
    assert meta["tool"]["flwr"]["app"]["config"]["spec-file"] == str(tmp_path / "spec.json")
