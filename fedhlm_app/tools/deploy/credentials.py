"""Credentials for a test deployment: a CA, the SuperLink's TLS certificate, SuperNode keys.

    python -m fedhlm_app.tools.deploy.credentials --out deploy-secrets --hosts localhost,127.0.0.1,superlink --nodes 4

writes into ``--out``:

- ``ca.crt`` (give it to every SuperNode, SuperExec and ``flwr`` CLI) and ``ca.key``;
- ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid
  for every name in ``--hosts`` (the addresses clients dial must be among them);
- ``node-<i>`` / ``node-<i>.pub``: one ECDSA (P-384) key pair per SuperNode in OpenSSH
  format, the format ``flwr supernode register`` and ``flower-supernode
  --auth-supernode-private-key`` expect.

For a test setup: a production CA keeps ``ca.key`` offline and each node creates
its own key pair (``ssh-keygen -t ecdsa -b 384``) and sends only the ``.pub``.
Uses the ``cryptography`` package (a Flower dependency), so no openssl is needed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365
CURVE = ec.SECP384R1()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedHLM test deployment"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    """IP addresses as IP entries (TLS clients match them only there), the rest as DNS names."""
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def write_tls(out: Path, hosts: list[str]) -> None:
    """A self-signed CA and a server certificate it signs, valid for ``hosts``."""
    if not hosts:
        raise ValueError("--hosts: give at least one host name or IP address the SuperLink is reached at")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(CURVE)
    ca = (
        x509.CertificateBuilder().subject_name(_name("FedHLM test CA")).issuer_name(_name("FedHLM test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(CURVE)
    server = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "server.pem", server.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.key", _pem_key(server_key), private=True)


def write_node_key(path: Path) -> Path:
    """An ECDSA key pair in OpenSSH format: ``path`` (private) and ``path.pub``."""
    key = ec.generate_private_key(CURVE)
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    public = path.with_name(path.name + ".pub")
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return public


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write into (created)")
    parser.add_argument("--hosts", default="localhost,127.0.0.1",
                        help="comma-separated names and IPs the SuperLink is reached at (default: %(default)s)")
    parser.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to create: node-0 .. node-<n-1>")
    parser.add_argument("--no-tls", action="store_true", help="only the node keys (keep an existing CA)")
    args = parser.parse_args(argv)
    if args.nodes < 0:
        parser.error(f"--nodes must be >= 0, got {args.nodes}")
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_tls:
        try:
            write_tls(args.out, hosts)
        except ValueError as exc:
            parser.error(str(exc))
        print(f"TLS: {args.out / 'ca.crt'}, {args.out / 'server.pem'} (valid for {', '.join(hosts)})")
    for i in range(args.nodes):
        print(f"SuperNode key: {write_node_key(args.out / f'node-{i}')}")


if __name__ == "__main__":
    main()
