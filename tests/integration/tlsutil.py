# SPDX-License-Identifier: LGPL-2.1-or-later
"""A private PKI made at test time with the openssl command: a CA, a server certificate for
127.0.0.1 and localhost, a client certificate, and a second CA that signed none of them (to show
that trust is not given by accident). Keys are EC P-256 (fast to make), mode 0600, valid 2 days.

    pki = tlsutil.shared_pki()      # made once per test process, removed at exit
    pki.ca_cert, pki.server_cert, pki.server_key, pki.client_cert, pki.client_key, pki.other_ca_cert
"""

import atexit
import os
import shutil
import subprocess
import tempfile
import threading

OPENSSL = shutil.which("openssl")


class Pki:
    def __init__(self, directory):
        self.directory = directory
        for name in ("ca", "other_ca", "server", "client"):
            setattr(self, name + "_cert", os.path.join(directory, name + ".pem"))
            setattr(self, name + "_key", os.path.join(directory, name + ".key"))

    def server_tls(self, require_client_cert=False):
        """The tls argument of OddProvider: serve with the server certificate; with
        require_client_cert, only clients presenting a certificate of our CA get through."""
        return {"cert": self.server_cert, "key": self.server_key,
                "client_ca": self.ca_cert if require_client_cert else None}


def _run(argv, cwd):
    p = subprocess.run([OPENSSL] + argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError("openssl %s failed: %s" % (" ".join(argv), p.stderr.decode("utf-8", "replace")))


def _key(path, cwd):
    _run(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path], cwd)
    os.chmod(path, 0o600)


def _ca(pki, name, subject):
    key, cert = getattr(pki, name + "_key"), getattr(pki, name + "_cert")
    _key(key, pki.directory)
    ext = os.path.join(pki.directory, name + ".ext")
    with open(ext, "w") as f:
        f.write("[v3]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
                "subjectKeyIdentifier=hash\n")
    _run(["req", "-new", "-x509", "-key", key, "-out", cert, "-days", "2", "-subj", subject,
          "-config", ext, "-extensions", "v3"], pki.directory)


def _leaf(pki, name, subject, extensions):
    key, cert = getattr(pki, name + "_key"), getattr(pki, name + "_cert")
    csr = os.path.join(pki.directory, name + ".csr")
    ext = os.path.join(pki.directory, name + ".ext")
    _key(key, pki.directory)
    _run(["req", "-new", "-key", key, "-out", csr, "-subj", subject], pki.directory)
    with open(ext, "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\nauthorityKeyIdentifier=keyid\n" + extensions)
    _run(["x509", "-req", "-in", csr, "-CA", pki.ca_cert, "-CAkey", pki.ca_key, "-out", cert, "-days", "2",
          "-set_serial", "0x%s" % os.urandom(8).hex(), "-extfile", ext], pki.directory)


def make_pki(directory):
    """Makes every file in directory (which must exist); returns the Pki."""
    if not OPENSSL:
        raise RuntimeError("the openssl command is needed (apt-get install openssl)")
    pki = Pki(directory)
    _ca(pki, "ca", "/CN=provider-router test CA")
    _ca(pki, "other_ca", "/CN=provider-router unrelated CA")
    _leaf(pki, "server", "/CN=localhost",
          "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
          "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _leaf(pki, "client", "/CN=provider-router test client",
          "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n")
    return pki


_lock = threading.Lock()
_shared = None


def shared_pki():
    """One PKI for the whole test process, made on first use and removed at exit."""
    global _shared
    with _lock:
        if _shared is None:
            d = tempfile.mkdtemp(prefix="provider-router-pki-")
            atexit.register(shutil.rmtree, d, True)
            _shared = make_pki(d)
        return _shared
