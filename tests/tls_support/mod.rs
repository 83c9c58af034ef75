//! Test support for TLS: a throw-away PKI made with the `openssl` command line, and `socat` TLS
//! terminators in front of a plain broker (RabbitMQ at 127.0.0.1:5672 unless told otherwise).
//!
//! Everything lives in a temporary folder removed on drop; every `socat` process is killed by its
//! PID on drop, so a failing test leaves nothing behind.
#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The passphrase of the PKCS#12 client bundles; error messages must never show it.
pub const P12_PASSPHRASE: &str = "p12-Secret-Passphrase-7f3a";

/// A CA, certificates it signed, and an unrelated second CA.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Generates every file (EC P-256 keys, so it takes well under a second).
    pub fn generate() -> Pki {
        let pki = Pki { dir: tempfile::tempdir().expect("temp dir") };
        pki.self_signed_ca("ca", "fhir-pubsub-test-CA");
        pki.self_signed_ca("other-ca", "unrelated-test-CA");
        let server = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth";
        pki.signed("server", "ca", "localhost", server);
        let elsewhere = "subjectAltName=DNS:elsewhere.test\nextendedKeyUsage=serverAuth";
        pki.signed("elsewhere", "ca", "elsewhere.test", elsewhere);
        pki.signed("client", "ca", "fhir-pubsub-client", "extendedKeyUsage=clientAuth");
        pki.signed("stranger", "other-ca", "stranger-client", "extendedKeyUsage=clientAuth");
        // The same key in SEC1 form (`EC PRIVATE KEY`), as older tools write it.
        pki.openssl("ec -in client.key -out client-sec1.key");
        // OpenSSL 3's defaults: PBES2 with AES-256-CBC and PBKDF2-SHA256, HMAC-SHA256 MAC.
        pki.openssl_with_passphrase("pkcs12 -export -in client.pem -inkey client.key -name client -out client.p12");
        // Windows' certificate export default (TripleDES-SHA1): 3DES for key and certificate, SHA-1 MAC.
        pki.openssl_with_passphrase(
            "pkcs12 -export -in client.pem -inkey client.key -name client -out client-3des.p12 \
             -certpbe PBE-SHA1-3DES -keypbe PBE-SHA1-3DES -macalg sha1",
        );
        // OpenSSL 1.x's defaults, found in many older .pfx files: RC2-40 for the certificate, 3DES
        // for the key (needs OpenSSL 3's legacy provider, which Debian ships).
        pki.openssl_with_passphrase(
            "pkcs12 -export -legacy -in client.pem -inkey client.key -name client -out client-legacy.p12",
        );
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The path as the text a settings file carries.
    pub fn setting(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    fn self_signed_ca(&self, name: &str, common_name: &str) {
        self.openssl(&format!(
            "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN={common_name} \
             -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
             -keyout {name}.key -out {name}.pem"
        ));
    }

    /// A leaf certificate `name.pem` (key `name.key`, PKCS#8 PEM) signed by the CA `ca`.
    fn signed(&self, name: &str, ca: &str, common_name: &str, extensions: &str) {
        let ext_file = self.path(&format!("{name}.ext"));
        std::fs::write(&ext_file, format!("basicConstraints=CA:FALSE\n{extensions}\n")).expect("ext file");
        self.openssl(&format!(
            "req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN={common_name} \
             -keyout {name}.key -out {name}.csr"
        ));
        self.openssl(&format!(
            "x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial -days 2 \
             -extfile {name}.ext -out {name}.pem"
        ));
    }

    fn openssl(&self, args: &str) {
        self.run_openssl(Command::new("openssl").args(args.split_whitespace()));
    }

    /// With `-passout` taken from the environment, so the passphrase is on no command line.
    fn openssl_with_passphrase(&self, args: &str) {
        let mut command = Command::new("openssl");
        command.args(args.split_whitespace()).args(["-passout", "env:P12_PASSPHRASE"]);
        self.run_openssl(command.env("P12_PASSPHRASE", P12_PASSPHRASE));
    }

    fn run_openssl(&self, command: &mut Command) {
        let output = command
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run openssl (scripts/services installs it)");
        assert!(output.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    }
}

/// A `socat` process terminating TLS on 127.0.0.1 and forwarding the plain bytes to 127.0.0.1:5672.
///
/// `socat` forks a child per connection; it runs in a process group of its own, led by the process
/// started here, so stopping the group by that PID also ends the connections it carries.
pub struct TlsTerminator {
    child: Child,
    listen: String,
    target: String,
    pub port: u16,
}

impl TlsTerminator {
    /// Serves `cert`/`key`; with `client_ca`, demands a client certificate signed by it.
    pub fn start(cert: &Path, key: &Path, client_ca: Option<&Path>) -> TlsTerminator {
        TlsTerminator::start_on(free_port(), cert, key, client_ca, 5672)
    }

    /// The same on `port`, forwarding to 127.0.0.1:`target` (another plain server than RabbitMQ).
    pub fn start_on(port: u16, cert: &Path, key: &Path, client_ca: Option<&Path>, target: u16) -> TlsTerminator {
        let mut listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={}",
            cert.display(),
            key.display()
        );
        match client_ca {
            Some(ca) => listen.push_str(&format!(",verify=1,cafile={}", ca.display())),
            None => listen.push_str(",verify=0"),
        }
        let target = format!("TCP:127.0.0.1:{target}");
        let child = spawn_socat(&listen, &target);
        let mut terminator = TlsTerminator { child, listen, target, port };
        terminator.wait_listening();
        terminator
    }

    /// Drops every connection and stops listening until [`TlsTerminator::resume`].
    pub fn cut(&mut self) {
        self.stop();
    }

    /// Listens again, on the same port and with the same settings.
    pub fn resume(&mut self) {
        self.child = spawn_socat(&self.listen, &self.target);
        self.wait_listening();
    }

    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let group = format!("-{}", self.child.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("socat exited at start: {status}");
            }
            if TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "socat did not listen on 127.0.0.1:{}", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_socat(listen: &str, target: &str) -> Child {
    Command::new("socat")
        .args([listen, target])
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run socat (scripts/services installs it)")
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
    listener.local_addr().expect("local address").port()
}
