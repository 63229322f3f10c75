//! Password reset mail over SMTP, through the real `turbocat` binary: a small SMTP server
//! written here (plain wire protocol, no TLS) receives the mail that ForgotPassword sends over
//! REST and gRPC, in `dev` and `serve`; the link in it resets the password once, and neither
//! the link nor the SMTP password reaches the server's log. A server that cannot be reached still answers 202.

#[path = "../support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use turbocat::proto::v1 as pb;
use turbocat::proto::v1::auth_service_client::AuthServiceClient;

const PASSWORD: &str = "correct horse battery staple";
const NEW_PASSWORD: &str = "a brand new passphrase 42";
const SMTP_USER: &str = "mailer";
const SMTP_PASSWORD: &str = "smtp-pa55-do-not-log";
const PUBLIC_URL: &str = "https://turbocat.example";

/// One message as the SMTP server received it.
#[derive(Debug, Clone)]
struct CapturedMail {
    mail_from: String,
    recipients: Vec<String>,
    /// The DATA section, dot-unstuffed, without the final `.` line.
    data: String,
    /// The decoded `AUTH PLAIN` credentials of the session, if any.
    credentials: Option<String>,
}

/// A tiny SMTP server on 127.0.0.1:0 that accepts everything and keeps what it receives.
struct SmtpCapture {
    port: u16,
    mails: Arc<Mutex<Vec<CapturedMail>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SmtpCapture {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SmtpCapture {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind smtp");
        let port = listener.local_addr().expect("smtp address").port();
        let mails = Arc::new(Mutex::new(Vec::new()));
        let sink = mails.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sink = sink.clone();
                tokio::spawn(async move {
                    let _ = serve_smtp_session(stream, sink).await;
                });
            }
        });
        Self { port, mails, task }
    }

    /// Waits (at most 15 s) for a mail to `recipient`.
    async fn mail_to(&self, recipient: &str) -> CapturedMail {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let found = self.mails.lock().expect("mails").iter().find_map(|mail| {
                mail.recipients.iter().any(|to| to == recipient).then(|| mail.clone())
            });
            if let Some(mail) = found {
                return mail;
            }
            assert!(tokio::time::Instant::now() < deadline, "no mail to {recipient}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn address_in(argument: &str) -> String {
    let start = argument.find('<').map_or(0, |index| index + 1);
    let end = argument.rfind('>').unwrap_or(argument.len());
    argument[start..end].to_owned()
}

/// Speaks the server side of one SMTP session (RFC 5321): greeting, EHLO/HELO, AUTH PLAIN,
/// MAIL, RCPT, DATA, RSET, NOOP, QUIT.
async fn serve_smtp_session(
    stream: TcpStream,
    sink: Arc<Mutex<Vec<CapturedMail>>>,
) -> std::io::Result<()> {
    use base64::Engine;
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(reader);
    writer.write_all(b"220 capture.test ESMTP ready\r\n").await?;
    let mut mail_from = String::new();
    let mut recipients = Vec::new();
    let mut credentials = None;
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end_matches(['\r', '\n']);
        let verb = command.split_whitespace().next().unwrap_or_default().to_ascii_uppercase();
        let argument = command.get(verb.len()..).unwrap_or_default().trim();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => {
                b"250-capture.test greets you\r\n250-8BITMIME\r\n250-AUTH PLAIN\r\n250 SMTPUTF8\r\n"
            }
            "HELO" => b"250 capture.test\r\n",
            "AUTH" => {
                let encoded = argument.strip_prefix("PLAIN").unwrap_or_default().trim();
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map(|bytes| {
                        String::from_utf8_lossy(&bytes).replace('\0', " ").trim().to_owned()
                    })
                    .unwrap_or_default();
                credentials = Some(decoded);
                b"235 2.7.0 authentication succeeded\r\n"
            }
            "MAIL" => {
                mail_from = address_in(argument);
                recipients.clear();
                b"250 2.1.0 ok\r\n"
            }
            "RCPT" => {
                recipients.push(address_in(argument));
                b"250 2.1.5 ok\r\n"
            }
            "DATA" => {
                writer.write_all(b"354 end data with <CR><LF>.<CR><LF>\r\n").await?;
                let mut data = String::new();
                loop {
                    line.clear();
                    if lines.read_line(&mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == ".\r\n" || line == ".\n" {
                        break;
                    }
                    data.push_str(line.strip_prefix('.').unwrap_or(&line));
                }
                sink.lock().expect("mails").push(CapturedMail {
                    mail_from: mail_from.clone(),
                    recipients: std::mem::take(&mut recipients),
                    data,
                    credentials: credentials.clone(),
                });
                b"250 2.0.0 queued\r\n"
            }
            "RSET" => {
                recipients.clear();
                b"250 2.0.0 ok\r\n"
            }
            "NOOP" => b"250 2.0.0 ok\r\n",
            "QUIT" => {
                writer.write_all(b"221 2.0.0 bye\r\n").await?;
                return Ok(());
            }
            _ => b"502 5.5.2 command not recognized\r\n",
        };
        writer.write_all(reply).await?;
    }
}

/// The reset token in a mail, after undoing quoted-printable soft breaks if any.
fn reset_token_in(mail: &CapturedMail) -> String {
    let body = mail.data.replace("=\r\n", "").replace("=3D", "=");
    let prefix = format!("{PUBLIC_URL}/reset-password?token=");
    let start =
        body.find(&prefix).unwrap_or_else(|| panic!("no reset link in {body}")) + prefix.len();
    body[start..]
        .chars()
        .take_while(|character| character.is_ascii_alphanumeric() || "-_".contains(*character))
        .collect()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("http client")
}

async fn rest_post(base_url: &str, path: &str, body: Value) -> (u16, Value) {
    let response =
        http().post(format!("{base_url}{path}")).json(&body).send().await.expect("rest request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json envelope"))
}

async fn grpc_auth(base_url: &str) -> AuthServiceClient<tonic::transport::Channel> {
    AuthServiceClient::connect(base_url.to_owned()).await.expect("grpc connect")
}

fn unique_email(label: &str) -> String {
    format!("{label}-{}@example.com", uuid::Uuid::new_v4().simple())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Rest,
    Grpc,
}

async fn register(base_url: &str, transport: Transport, email: &str) {
    match transport {
        Transport::Rest => {
            let body = json!({ "email": email, "password": PASSWORD, "fullName": "Mia" });
            let (status, envelope) = rest_post(base_url, "/api/v1/auth/register", body).await;
            assert_eq!(status, 201, "{envelope}");
        }
        Transport::Grpc => {
            let request = pb::RegisterRequest {
                email: email.to_owned(),
                password: PASSWORD.to_owned(),
                full_name: "Mia".to_owned(),
            };
            grpc_auth(base_url).await.register(request).await.expect("grpc register");
        }
    }
}

async fn forgot_password(base_url: &str, transport: Transport, email: &str) {
    match transport {
        Transport::Rest => {
            let body = json!({ "email": email });
            let (status, envelope) =
                rest_post(base_url, "/api/v1/auth/forgot-password", body).await;
            assert_eq!(status, 202, "{envelope}");
            assert_eq!(envelope["data"], json!({}));
        }
        Transport::Grpc => {
            let request = pb::ForgotPasswordRequest { email: email.to_owned() };
            grpc_auth(base_url).await.forgot_password(request).await.expect("grpc forgot");
        }
    }
}

/// Ok(()) or the error code.
async fn reset_password(base_url: &str, transport: Transport, token: &str) -> Result<(), String> {
    match transport {
        Transport::Rest => {
            let body = json!({ "token": token, "newPassword": NEW_PASSWORD });
            let (status, envelope) = rest_post(base_url, "/api/v1/auth/reset-password", body).await;
            if envelope["success"] == true {
                assert_eq!(status, 200);
                return Ok(());
            }
            Err(envelope["error"]["code"].as_str().unwrap_or_default().to_owned())
        }
        Transport::Grpc => {
            let request = pb::ResetPasswordRequest {
                token: token.to_owned(),
                new_password: NEW_PASSWORD.to_owned(),
            };
            match grpc_auth(base_url).await.reset_password(request).await {
                Ok(_) => Ok(()),
                Err(status) => Err(turbocat::error::ServiceError::from_status(&status)
                    .code
                    .as_str()
                    .to_owned()),
            }
        }
    }
}

async fn login_status(base_url: &str, email: &str, password: &str) -> u16 {
    let body = json!({ "email": email, "password": password });
    rest_post(base_url, "/api/v1/auth/login", body).await.0
}

fn smtp_url(smtp: &SmtpCapture) -> String {
    format!("smtp://{SMTP_USER}:{SMTP_PASSWORD}@127.0.0.1:{}", smtp.port)
}

const FROM: &str = "Turbocat <no-reply@turbocat.example>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgot_password_mails_a_link_that_resets_the_password_once_over_both_transports() {
    let smtp = SmtpCapture::start().await;
    let smtp_url = smtp_url(&smtp);
    let (server, _data) = support::start_dev(&[
        "--smtp-url",
        smtp_url.as_str(),
        "--smtp-from",
        FROM,
        "--public-url",
        PUBLIC_URL,
    ]);
    check_mailed_reset_flow(&server, &smtp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_mails_the_reset_link_too() {
    let smtp = SmtpCapture::start().await;
    let smtp_url = smtp_url(&smtp);
    let (server, _database) = support::start_serve(&[
        "--smtp-url",
        smtp_url.as_str(),
        "--smtp-from",
        FROM,
        "--public-url",
        PUBLIC_URL,
    ])
    .await;
    check_mailed_reset_flow(&server, &smtp).await;
}

/// Over REST then gRPC: register, ForgotPassword, the mail arrives, its token resets once; an
/// unknown address gets no mail; no link, token or SMTP password in the log.
async fn check_mailed_reset_flow(server: &support::TurbocatProcess, smtp: &SmtpCapture) {
    let base_url = server.base_url();
    let mut tokens = Vec::new();
    for transport in [Transport::Rest, Transport::Grpc] {
        let email = unique_email(&format!("{transport:?}").to_lowercase());
        register(&base_url, transport, &email).await;
        // The address is matched case-insensitively and mailed in its stored form.
        forgot_password(&base_url, transport, &email.to_uppercase()).await;
        let mail = smtp.mail_to(&email).await;
        assert_eq!(mail.recipients, vec![email.clone()], "{transport:?}");
        assert_eq!(mail.mail_from, "no-reply@turbocat.example");
        assert_eq!(
            mail.credentials.as_deref(),
            Some(format!("{SMTP_USER} {SMTP_PASSWORD}").as_str())
        );
        assert!(mail.data.contains(&format!("To: {email}")), "{}", mail.data);
        assert!(mail.data.contains("Subject: Reset your Turbocat password"), "{}", mail.data);
        assert!(mail.data.contains("30 minutes"), "{}", mail.data);
        let token = reset_token_in(&mail);
        assert!(token.len() >= 40, "a 256-bit token: {token}");

        assert_eq!(login_status(&base_url, &email, NEW_PASSWORD).await, 401);
        reset_password(&base_url, transport, &token).await.expect("the mailed token resets");
        assert_eq!(
            reset_password(&base_url, transport, &token).await,
            Err("UNAUTHORIZED".to_owned()),
            "the token works once ({transport:?})"
        );
        assert_eq!(login_status(&base_url, &email, NEW_PASSWORD).await, 200);
        assert_eq!(login_status(&base_url, &email, PASSWORD).await, 401);
        tokens.push(token);
    }
    assert_ne!(tokens[0], tokens[1]);
    // An unknown address gets the same answer and no mail.
    forgot_password(&base_url, Transport::Rest, &unique_email("nobody")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(smtp.mails.lock().expect("mails").len(), 2);

    let log =
        server.stderr_text() + &server.stdout.lock().map(|text| text.clone()).unwrap_or_default();
    assert!(log.contains("password reset mail sent"), "{log}");
    for token in &tokens {
        assert!(!log.contains(token.as_str()), "a reset token in the log");
    }
    assert!(!log.contains("reset-password?token="), "a reset link in the log: {log}");
    assert!(!log.contains(SMTP_PASSWORD), "the smtp password in the log: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_server_that_cannot_be_reached_is_logged_and_the_answer_stays_202() {
    // A port bound but never listened on, and held for the whole test: a connection to it is
    // refused, and no other socket (the server's own listener above all) can be given it.
    let unreachable = tokio::net::TcpSocket::new_v4().expect("socket");
    unreachable.bind("127.0.0.1:0".parse().expect("address")).expect("bind");
    let port = unreachable.local_addr().expect("address").port();
    let smtp_url = format!("smtp://{SMTP_USER}:{SMTP_PASSWORD}@127.0.0.1:{port}");
    let (server, _data) = support::start_dev(&[
        "--smtp-url",
        smtp_url.as_str(),
        "--smtp-from",
        "no-reply@turbocat.example",
    ]);
    let base_url = server.base_url();
    let email = unique_email("unreachable");
    register(&base_url, Transport::Rest, &email).await;
    forgot_password(&base_url, Transport::Rest, &email).await;
    forgot_password(&base_url, Transport::Grpc, &email).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !server.stderr_text().contains("password reset mail not sent") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failure logged: {}",
            server.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log =
        server.stderr_text() + &server.stdout.lock().map(|text| text.clone()).unwrap_or_default();
    assert!(!log.contains("reset-password?token="), "a reset link in the log: {log}");
    assert!(!log.contains(SMTP_PASSWORD), "the smtp password in the log: {log}");
    assert!(log.contains(&format!("127.0.0.1:{port}")), "the log names the server: {log}");
}

#[test]
fn smtp_settings_are_checked_at_start_up_without_showing_the_password() {
    let data = tempfile::tempdir().expect("temporary directory");
    let data_dir = data.path().to_str().expect("utf-8 path");
    let base = ["dev", "--listen", "127.0.0.1:0", "--data-dir", data_dir];
    let with = |extra: &[&str]| {
        let mut arguments = base.to_vec();
        arguments.extend_from_slice(extra);
        support::run_turbocat(&arguments, &[])
    };
    let url = format!("smtp://{SMTP_USER}:{SMTP_PASSWORD}@127.0.0.1:2525");
    let (success, _, stderr) = with(&["--smtp-url", url.as_str()]);
    assert!(!success);
    assert!(stderr.contains("--smtp-from"), "{stderr}");
    assert!(!stderr.contains(SMTP_PASSWORD), "{stderr}");
    let (success, _, stderr) = with(&["--smtp-url", url.as_str(), "--smtp-from", "not an address"]);
    assert!(!success);
    assert!(stderr.contains("--smtp-from"), "{stderr}");
    let bad_scheme = format!("http://{SMTP_USER}:{SMTP_PASSWORD}@127.0.0.1:2525");
    let (success, _, stderr) =
        with(&["--smtp-url", bad_scheme.as_str(), "--smtp-from", "no-reply@turbocat.example"]);
    assert!(!success);
    assert!(stderr.contains("--smtp-url"), "{stderr}");
    assert!(!stderr.contains(SMTP_PASSWORD), "{stderr}");
    let (success, _, stderr) = with(&["--smtp-from", "no-reply@turbocat.example"]);
    assert!(!success);
    assert!(stderr.contains("--smtp-url"), "{stderr}");
}
