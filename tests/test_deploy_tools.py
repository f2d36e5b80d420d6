"""The deployment tools: test credentials and per-SuperNode data folders."""

import ipaddress
import subprocess
import sys

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedhlm_app.config import validate
from fedhlm_app.data.datasets import load_local, truncate
from fedhlm_app.data.partition import partition_clients
from fedhlm_app.paths import BUNDLED_DATA
from fedhlm_app.tools.deploy.credentials import write_node_key, write_tls
from fedhlm_app.tools.deploy.node_data import write_node_folders
from helpers import ROOT, default_run_config


def test_server_certificate_is_signed_by_the_ca_for_every_host(tmp_path):
    write_tls(tmp_path, ["localhost", "127.0.0.1", "superlink"])
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer does not match
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "superlink"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    key = serialization.load_pem_private_key((tmp_path / "server.key").read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0  # private keys are not world-readable


def test_node_keys_are_ecdsa_openssh_pairs(tmp_path):
    public = write_node_key(tmp_path / "node-0")
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    private = serialization.load_ssh_private_key((tmp_path / "node-0").read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) == public.read_bytes().strip()


def test_credentials_cli_refuses_an_empty_host_list(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedhlm_app.tools.deploy.credentials", "--out", str(tmp_path), "--hosts", ","],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "--hosts: give at least one host" in proc.stderr
    assert not (tmp_path / "ca.key").exists()


def test_node_folders_hold_the_simulation_partitions(tmp_path):
    cfg = validate(default_run_config(**{"dirichlet-alpha": 0.1}))  # strong skew: some nodes lack classes
    dataset = load_local(BUNDLED_DATA, cfg.train_file, cfg.test_file)
    folders = write_node_folders(dataset, cfg, 4, tmp_path)
    train = truncate(dataset.train, cfg.max_train_items, cfg.seed)
    test = truncate(dataset.test, cfg.max_test_items, cfg.seed)
    parts = partition_clients(train.labels, test.labels, 4, 0.1, cfg.seed, cfg.calibration_fraction, cfg.min_partition_size)
    missing_a_class = 0
    for folder, part in zip(folders, parts):
        node = load_local(folder, "train.csv", "test.csv")
        rows = np.sort(np.concatenate([part.fit, part.calibration]))
        assert node.train.texts == train.subset(rows).texts and node.test.texts == test.subset(part.test).texts
        # class ids are the federation's, even where this node lacks some classes
        assert node.class_names == dataset.class_names
        np.testing.assert_array_equal(node.train.labels, train.labels[rows])
        missing_a_class += len(set(node.train.labels.tolist())) < dataset.num_classes
    assert missing_a_class > 0  # the case the classes.txt mapping exists for


@pytest.mark.parametrize("args, message", [
    (["--num-partitions", "0"], "--num-partitions must be >= 1"),
    (["--num-partitions", "2", "--data-dir", "/nonexistent"], "is not a directory"),
    (["--num-partitions", "2", "--run-config", "conf/none.toml"], "run-config file 'conf/none.toml' not found"),
])
def test_node_data_cli_says_what_is_wrong(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "fedhlm_app.tools.deploy.node_data", "--out", str(tmp_path / "out"),
                           "--data-dir", str(BUNDLED_DATA), *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_walkthrough_preset_is_the_smoke_run_over_the_oracle_service():
    from fedhlm_app.tools.launch import merged_config

    smoke = validate(merged_config([str(ROOT / "conf" / "smoke.toml")], []))
    deployment = validate(merged_config([str(ROOT / "conf" / "deployment.toml")], []))
    differing = {k for k, v in smoke.as_dict().items() if v != deployment.as_dict()[k]}
    assert differing == {"run-name", "oracle", "oracle-url"}
    assert deployment.oracle == "remote" and deployment.oracle_url.startswith("https://")
