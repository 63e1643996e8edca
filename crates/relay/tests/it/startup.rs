//! Start-up as an operator meets it: what the binary says on stdout (the log) and stderr (the
//! error), and with which exit code, when things are right and when they are not.

use crate::common::test_cert;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ews-relay");
const LOCAL: [&str; 4] = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
/// The log line that says the relay is up.
const LISTENING: &str = "ews-relay listening";
/// How long a start may take on a loaded 2-core test machine.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// What one run of the binary printed.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn all(&self) -> String {
        format!("{}{}", self.stderr, self.stdout)
    }
}

fn command(program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Run to completion (every case here fails at start-up).
fn run_to_exit(mut cmd: Command) -> Run {
    let out = cmd.output().unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Start the binary, wait for the line saying it listens, stop it with SIGTERM, and return
/// everything it printed. Panics when it exits or stays silent instead.
fn start_and_stop(args: &[&str]) -> Run {
    let mut child = command(BIN, args).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(LISTENING) => break,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                let mut err = String::new();
                let _ = stderr.read_to_string(&mut err);
                panic!(
                    "no '{LISTENING}' line: {err}{}",
                    reader.join().unwrap_or_default()
                );
            }
        }
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    let mut err = String::new();
    stderr.read_to_string(&mut err).unwrap();
    Run {
        code: status.code(),
        stdout: reader.join().unwrap(),
        stderr: err,
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn with_local<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = LOCAL.to_vec();
    all.extend_from_slice(args);
    all
}

#[test]
fn a_warning_given_while_validating_flags_is_logged() {
    // A plain-http --ews-url is warned about while the flags are validated; a later flag is
    // wrong, so start-up stops there: both the warning and the error must be visible.
    let run = run_to_exit(command(
        BIN,
        &with_local(&[
            "--ews-url",
            "http://127.0.0.1:9/EWS/Exchange.asmx",
            "--mailbox",
            "room1@example.com",
            "--auth",
            "none",
        ]),
    ));
    assert_eq!(run.code, Some(64), "{}", run.all());
    assert!(
        run.stdout.contains("WARN") && run.stdout.contains("plain http"),
        "the warning is in the log: {}",
        run.all()
    );
    assert!(run.stderr.contains("--callback-url"), "{}", run.all());

    // And when start-up succeeds, in the JSON log.
    let dir = tempfile::tempdir().unwrap();
    let run = start_and_stop(&with_local(&[
        "--ews-url",
        "http://127.0.0.1:9/EWS/Exchange.asmx",
        "--mailbox",
        "room1@example.com",
        "--auth",
        "none",
        "--callback-url",
        "https://relay.example.com/ews/push",
        "--path-prefix",
        "/ews",
        "--allow",
        "127.0.0.1",
        "--cert-dir",
        &s(&dir.path().join("certs")),
        "--state-dir",
        &s(&dir.path().join("state")),
        "--log-format",
        "json",
    ]));
    assert_eq!(run.code, Some(0), "{}", run.all());
    let warning = run
        .stdout
        .lines()
        .find(|l| l.contains("plain http"))
        .unwrap_or_else(|| panic!("warning in {}", run.stdout));
    assert!(
        warning.starts_with('{') && warning.contains("\"level\":\"WARN\""),
        "{warning}"
    );
    let listening = run.stdout.lines().find(|l| l.contains(LISTENING)).unwrap();
    assert!(listening.contains("\"mode\":\"managed\""), "{listening}");
}

#[test]
fn the_start_up_log_says_which_certificate_admin_address_and_mode() {
    let dir = tempfile::tempdir().unwrap();
    let cert_dir = dir.path().join("certs");
    let cert_dir_arg = s(&cert_dir);
    let args = with_local(&[
        "--allow",
        "127.0.0.1",
        "--hostname",
        "relay.test",
        "--cert-dir",
        &cert_dir_arg,
    ]);
    let first = start_and_stop(&args);
    assert_eq!(first.code, Some(0), "{}", first.all());
    let (cert, key) = ews_relay::edge::tls::self_signed_paths(&cert_dir, "relay.test");
    let line = first
        .stdout
        .lines()
        .find(|l| l.contains("SELF-SIGNED"))
        .unwrap_or_else(|| panic!("certificate line in {}", first.stdout));
    assert!(line.contains(&s(&cert)), "certificate file: {line}");
    assert!(line.contains(&s(&key)), "key file: {line}");
    assert!(line.contains("generated now"), "{line}");
    let listening = first
        .stdout
        .lines()
        .find(|l| l.contains(LISTENING))
        .unwrap();
    assert!(
        listening.contains("admin=127.0.0.1:") && !listening.contains("admin=127.0.0.1:0 "),
        "the admin address actually bound: {listening}"
    );
    assert!(listening.contains("mode=\"passthrough\""), "{listening}");

    let second = start_and_stop(&args);
    let line = second
        .stdout
        .lines()
        .find(|l| l.contains("SELF-SIGNED"))
        .unwrap();
    assert!(line.contains("reused from an earlier start"), "{line}");

    // The operator's own files.
    let tc = test_cert();
    let run = start_and_stop(&with_local(&[
        "--allow",
        "127.0.0.1",
        "--tls-cert",
        &s(&tc.cert_path),
        "--tls-key",
        &s(&tc.key_path),
    ]));
    let line = run
        .stdout
        .lines()
        .find(|l| l.contains("serving certificate"))
        .unwrap_or_else(|| panic!("certificate line in {}", run.stdout));
    assert!(
        line.contains(&s(&tc.cert_path)) && line.contains("operator files"),
        "{line}"
    );
}

#[test]
fn an_expired_certificate_is_called_expired_once() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let run = start_and_stop(&with_local(&[
        "--allow",
        "127.0.0.1",
        "--tls-cert",
        &s(&cert_path),
        "--tls-key",
        &s(&key_path),
    ]));
    assert_eq!(run.code, Some(0), "{}", run.all());
    assert_eq!(
        run.stdout.matches("EXPIRED").count(),
        1,
        "said once: {}",
        run.stdout
    );
    assert!(run.stdout.contains("expired=2021-01-01"), "{}", run.stdout);
    assert!(
        !run.stdout.contains("within 14 days"),
        "not 'expires soon': {}",
        run.stdout
    );
}

#[test]
fn a_taken_port_is_reported_once_with_exit_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let run = run_to_exit(command(
        BIN,
        &[
            "--listen",
            &addr,
            "--admin-listen",
            "127.0.0.1:0",
            "--cert-dir",
            &s(dir.path()),
        ],
    ));
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert_eq!(
        run.all().matches("cannot listen").count(),
        1,
        "printed once: {}",
        run.all()
    );
    assert!(
        run.stderr.contains("--listen") && run.stderr.contains("another process"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_privileged_port_as_an_unprivileged_user_hints_at_the_capability() {
    let first_free: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024);
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let setpriv = Command::new("setpriv").arg("--version").output().is_ok();
    if !root || !setpriv || first_free <= 443 {
        eprintln!(
            "SKIPPED: needs root and setpriv to run as nobody, and ports below {first_free} privileged (root={root}, setpriv={setpriv})"
        );
        return;
    }
    // The kernel refuses the bind with EACCES before it checks whether the port is in use, so
    // a fixed port is safe here.
    let run = run_to_exit(command(
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            BIN,
            "--listen",
            "127.0.0.1:443",
            "--admin-listen",
            "127.0.0.1:0",
            "--cert-dir",
            "/nonexistent",
        ],
    ));
    assert_eq!(run.code, Some(1), "{}", run.all());
    let e = &run.stderr;
    assert!(e.contains("--listen 127.0.0.1:443"), "{e}");
    assert!(e.contains("Permission denied"), "{e}");
    assert!(e.contains("CAP_NET_BIND_SERVICE"), "{e}");
    assert!(e.contains("setcap cap_net_bind_service=+ep"), "{e}");
    assert_eq!(
        run.all().matches("cannot listen").count(),
        1,
        "{}",
        run.all()
    );
}

#[test]
fn key_and_certificate_mix_ups_name_the_flag_and_the_fix() {
    let a = test_cert();
    let p = |x: &Path| s(x);
    // Swapped flags.
    let run = run_to_exit(command(
        BIN,
        &with_local(&["--tls-cert", &p(&a.key_path), "--tls-key", &p(&a.cert_path)]),
    ));
    assert_eq!(run.code, Some(64), "{}", run.all());
    assert!(
        run.stderr.contains("--tls-cert") && run.stderr.contains("swapped"),
        "{}",
        run.stderr
    );
    // A certificate where the key belongs.
    let run = run_to_exit(command(
        BIN,
        &with_local(&[
            "--tls-cert",
            &p(&a.cert_path),
            "--tls-key",
            &p(&a.cert_path),
        ]),
    ));
    assert_eq!(run.code, Some(64), "{}", run.all());
    assert!(
        run.stderr.starts_with("ews-relay: --tls-key: ")
            && run.stderr.contains("holds a CERTIFICATE")
            && !run.stderr.contains("--tls-cert:"),
        "{}",
        run.stderr
    );
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
}

#[test]
fn an_encrypted_key_says_it_is_encrypted_and_how_to_decrypt_it() {
    let a = test_cert();
    let pkcs8 = a.dir.path().join("encrypted-pkcs8.pem");
    let legacy = a.dir.path().join("encrypted-legacy.pem");
    let made = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let key = s(&a.key_path);
    if !made(&[
        "pkey",
        "-in",
        &key,
        "-aes256",
        "-passout",
        "pass:x",
        "-out",
        &s(&pkcs8),
    ]) {
        eprintln!("SKIPPED: openssl not found");
        return;
    }
    assert!(made(&[
        "ec",
        "-in",
        &key,
        "-aes256",
        "-passout",
        "pass:x",
        "-out",
        &s(&legacy),
    ]));
    for file in [&pkcs8, &legacy] {
        let run = run_to_exit(command(
            BIN,
            &with_local(&["--tls-cert", &s(&a.cert_path), "--tls-key", &s(file)]),
        ));
        assert_eq!(run.code, Some(64), "{}", run.all());
        let e = &run.stderr;
        assert!(e.contains("--tls-key"), "{e}");
        assert!(e.contains("encrypted"), "{e}");
        assert!(e.contains(&format!("openssl pkey -in {}", s(file))), "{e}");
    }
}

#[test]
fn allow_replaces_the_default_and_the_log_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let cert_dir = s(dir.path());
    let run = start_and_stop(&with_local(&[
        "--allow",
        "127.0.0.1",
        "--cert-dir",
        &cert_dir,
    ]));
    let listening = run.stdout.lines().find(|l| l.contains(LISTENING)).unwrap();
    assert!(
        listening.contains("--allow (1 networks)") && !listening.contains("exchange-online"),
        "{listening}"
    );
    assert!(
        run.stdout
            .contains("Exchange Online cannot connect; add --allow-preset exchange-online"),
        "{}",
        run.stdout
    );

    // Named explicitly: the union, and nothing to explain.
    let run = start_and_stop(&with_local(&[
        "--allow",
        "127.0.0.1",
        "--allow-preset",
        "exchange-online",
        "--cert-dir",
        &cert_dir,
    ]));
    let listening = run.stdout.lines().find(|l| l.contains(LISTENING)).unwrap();
    assert!(
        listening.contains("--allow (1 networks)") && listening.contains("preset exchange-online"),
        "{listening}"
    );
    assert!(!run.stdout.contains("allow-list:"), "{}", run.stdout);

    // Nothing given: the default, said to be the default.
    let run = start_and_stop(&with_local(&["--cert-dir", &cert_dir]));
    assert!(
        run.stdout
            .contains("the exchange-online preset applies (the default)"),
        "{}",
        run.stdout
    );
}

#[test]
fn managed_mode_at_exchange_online_without_its_networks_is_warned_about() {
    let managed = |extra: &[&str]| {
        let mut args = with_local(&[
            "--ews-url",
            "https://outlook.office365.com/EWS/Exchange.asmx",
            "--mailbox",
            "room1@example.com",
            "--auth",
            "none",
            "--callback-url",
            "https://relay.example.com/push",
            // Stops start-up right after the allow-list is checked.
            "--max-connections",
            "0",
        ]);
        args.extend_from_slice(extra);
        run_to_exit(command(BIN, &args))
    };
    let run = managed(&["--allow", "10.1.2.3"]);
    assert_eq!(run.code, Some(64), "{}", run.all());
    assert!(
        run.stdout.contains("WARN")
            && run.stdout.contains("outlook.office365.com")
            && run.stdout.contains("add --allow-preset exchange-online"),
        "{}",
        run.all()
    );
    let run = managed(&["--allow", "10.1.2.3", "--allow-preset", "exchange-online"]);
    assert!(!run.stdout.contains("WARN"), "{}", run.all());
    let run = managed(&[]);
    assert!(
        !run.stdout.contains("WARN"),
        "the default admits it: {}",
        run.all()
    );
}

#[test]
fn help_documents_exit_codes_and_the_allow_list() {
    let run = run_to_exit(command(BIN, &["--help"]));
    assert_eq!(run.code, Some(0));
    let h = &run.stdout;
    assert!(h.contains("Exit codes: 0"), "{h}");
    assert!(h.contains("; 1 start-up failed"), "{h}");
    assert!(h.contains("; 64 a flag's value is wrong"), "{h}");
    assert!(
        h.contains("--allow-preset exchange-online --allow CIDR"),
        "{h}"
    );
}

#[test]
fn a_store_from_a_newer_version_is_refused_with_exit_1() {
    use ews_relay::store::{Store, SCHEMA_VERSION, STORE_FILE_NAME};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    drop(Store::open(&state).unwrap());
    {
        const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
        let db = redb::Database::open(state.join(STORE_FILE_NAME)).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("schema_version", SCHEMA_VERSION + 1)
            .unwrap();
        txn.commit().unwrap();
    }
    let run = run_to_exit(command(
        BIN,
        &with_local(&[
            "--ews-url",
            "https://127.0.0.1:9/EWS/Exchange.asmx",
            "--mailbox",
            "room1@example.com",
            "--auth",
            "none",
            "--callback-url",
            "https://relay.example.com/push",
            "--allow",
            "127.0.0.1",
            "--cert-dir",
            &s(&dir.path().join("certs")),
            "--state-dir",
            &s(&state),
        ]),
    ));
    assert_eq!(run.code, Some(1), "{}", run.all());
    assert!(
        run.stderr.starts_with("ews-relay: --state-dir: ")
            && run.stderr.contains("written by a newer ews-relay"),
        "{}",
        run.stderr
    );
    assert_eq!(
        run.all().matches("newer ews-relay").count(),
        1,
        "{}",
        run.all()
    );
}
