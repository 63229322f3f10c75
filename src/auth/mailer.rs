//! Mail the product sends: for now only password reset links. `SmtpMailer` sends them through
//! an SMTP server (`--smtp-url`); `LogMailer` writes them to the log when none is configured.
//! May call: config (settings), `lettre`, `tracing`.

use async_trait::async_trait;
use lettre::message::{Mailbox, header::ContentType};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use uuid::Uuid;

use crate::config::{ConnectionUrl, SettingError};

/// A password reset message for one user.
pub struct PasswordResetMail<'a> {
    pub user_id: Uuid,
    pub email: &'a str,
    /// The link with the single-use token; a secret for 30 minutes.
    pub reset_link: &'a str,
    pub expires_in_minutes: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("the mail could not be sent: {0}")]
pub struct MailError(pub String);

/// Sends the product's mail.
#[async_trait]
pub trait Mailer: Send + Sync {
    async fn send_password_reset(&self, mail: PasswordResetMail<'_>) -> Result<(), MailError>;
}

/// Writes each message to the log at info level, the link in the `reset_link` field. This is
/// the only place a reset token is ever logged, on purpose: without `--smtp-url` the log is the
/// mailbox.
#[derive(Debug, Default)]
pub struct LogMailer;

#[async_trait]
impl Mailer for LogMailer {
    async fn send_password_reset(&self, mail: PasswordResetMail<'_>) -> Result<(), MailError> {
        tracing::info!(
            user_id = %mail.user_id,
            email = mail.email,
            reset_link = mail.reset_link,
            expires_in_minutes = mail.expires_in_minutes,
            "password reset link (log mailer)"
        );
        Ok(())
    }
}

/// Sends mail through an SMTP server with lettre: `smtps://` is TLS from the first byte,
/// `smtp://…?tls=required` upgrades with STARTTLS (both through rustls), plain `smtp://` is
/// unencrypted. Neither the link nor the password ever reaches the log or an error.
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    /// The server URL without its password, for logs.
    server: String,
}

impl std::fmt::Debug for SmtpMailer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SmtpMailer")
            .field("server", &self.server)
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

impl SmtpMailer {
    /// A mailer for `--smtp-url` and `--smtp-from`, both checked. Connects lazily; must be
    /// called on the tokio runtime (the connection pool lives there).
    pub fn new(url: &ConnectionUrl, from: &str) -> Result<Self, SettingError> {
        let url_error = |problem: String| SettingError {
            flag: "--smtp-url",
            variable: "TURBOCAT_SMTP_URL",
            problem,
        };
        let server = url.redacted();
        let parsed = url::Url::parse(url.expose())
            .map_err(|error| url_error(format!("not a URL ({error})")))?;
        if !matches!(parsed.scheme(), "smtp" | "smtps") {
            return Err(url_error(format!(
                "unsupported scheme `{}`; expected smtps:// or smtp://",
                parsed.scheme()
            )));
        }
        // lettre's errors never quote the URL, so they cannot leak its password.
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url.expose())
            .map_err(|error| url_error(format!("{server} is not usable: {error}")))?
            .build();
        let from = from.trim().parse::<Mailbox>().map_err(|error| SettingError {
            flag: "--smtp-from",
            variable: "TURBOCAT_SMTP_FROM",
            problem: format!(
                "not a mail address such as `Turbocat <no-reply@example.com>` ({error})"
            ),
        })?;
        let encrypted = parsed.scheme() == "smtps"
            || parsed.query_pairs().any(|(key, value)| key == "tls" && value == "required");
        if !encrypted {
            tracing::warn!(server = %server, "smtp mail is sent without required tls");
        }
        Ok(Self { transport, from, server })
    }

    /// The mailer that `--smtp-url` / `--smtp-from` select: `None` when neither is set.
    pub fn from_settings(
        url: Option<&ConnectionUrl>,
        from: Option<&str>,
    ) -> Result<Option<Self>, SettingError> {
        let from = from.map(str::trim).filter(|text| !text.is_empty());
        match (url, from) {
            (None, None) => Ok(None),
            (Some(url), Some(from)) => Self::new(url, from).map(Some),
            (Some(_), None) => Err(SettingError {
                flag: "--smtp-from",
                variable: "TURBOCAT_SMTP_FROM",
                problem: "required with --smtp-url".to_owned(),
            }),
            (None, Some(_)) => Err(SettingError {
                flag: "--smtp-url",
                variable: "TURBOCAT_SMTP_URL",
                problem: "required with --smtp-from".to_owned(),
            }),
        }
    }
}

fn password_reset_message(
    from: &Mailbox,
    mail: &PasswordResetMail<'_>,
) -> Result<Message, MailError> {
    let recipient = mail
        .email
        .parse::<Mailbox>()
        .map_err(|error| MailError(format!("the recipient address is not usable: {error}")))?;
    let body = format!(
        "Someone asked to reset the password of your Turbocat account.\r\n\r\n\
         Open this link within {minutes} minutes to choose a new password:\r\n\r\n\
         {link}\r\n\r\n\
         If it was not you, ignore this mail: your password stays as it is.\r\n",
        minutes = mail.expires_in_minutes,
        link = mail.reset_link,
    );
    Message::builder()
        .from(from.clone())
        .to(recipient)
        .subject("Reset your Turbocat password")
        .header(ContentType::TEXT_PLAIN)
        .body(body)
        .map_err(|error| MailError(format!("the message cannot be built: {error}")))
}

#[async_trait]
impl Mailer for SmtpMailer {
    async fn send_password_reset(&self, mail: PasswordResetMail<'_>) -> Result<(), MailError> {
        let message = password_reset_message(&self.from, &mail)?;
        match self.transport.send(message).await {
            Ok(_) => {
                tracing::info!(user_id = %mail.user_id, server = %self.server, "password reset mail sent");
                Ok(())
            }
            Err(error) => {
                // The error describes the connection or the server's answer, never the message.
                tracing::warn!(
                    user_id = %mail.user_id,
                    server = %self.server,
                    %error,
                    "password reset mail not sent"
                );
                Err(MailError(format!("smtp server {}: {error}", self.server)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> ConnectionUrl {
        text.parse().unwrap()
    }

    // The transport's connection pool lives on the tokio runtime.
    #[tokio::test]
    async fn tls_and_starttls_urls_build_through_rustls_and_hide_the_password() {
        for text in [
            "smtps://mailer:hunter2-secret@mail.example.com",
            "smtp://mailer:hunter2-secret@mail.example.com:587?tls=required",
            "smtp://mailer:hunter2-secret@127.0.0.1:2525",
        ] {
            let mailer = SmtpMailer::new(&url(text), "Turbocat <no-reply@example.com>").unwrap();
            let shown = format!("{mailer:?}");
            assert!(!shown.contains("hunter2-secret"), "{shown}");
            assert!(shown.contains("mail.example.com") || shown.contains("127.0.0.1"), "{shown}");
        }
    }

    #[tokio::test]
    async fn settings_come_in_pairs_and_errors_hide_the_password() {
        assert!(SmtpMailer::from_settings(None, None).unwrap().is_none());
        assert!(SmtpMailer::from_settings(None, Some("  ")).unwrap().is_none());
        let smtp = url("smtp://mailer:hunter2-secret@127.0.0.1:2525");
        let error = SmtpMailer::from_settings(Some(&smtp), None).unwrap_err();
        assert_eq!(error.flag, "--smtp-from");
        let error = SmtpMailer::from_settings(None, Some("a@example.com")).unwrap_err();
        assert_eq!(error.flag, "--smtp-url");
        let error = SmtpMailer::new(&smtp, "no address").unwrap_err();
        assert_eq!(error.flag, "--smtp-from");
        for bad in [
            "imap://mailer:hunter2-secret@127.0.0.1:143",
            "smtp://mailer:hunter2-secret@127.0.0.1:25?tls=sometimes",
        ] {
            let error = SmtpMailer::new(&url(bad), "a@example.com").unwrap_err();
            assert_eq!(error.flag, "--smtp-url");
            assert!(!error.to_string().contains("hunter2-secret"), "{error}");
        }
    }

    #[test]
    fn the_message_goes_to_the_user_and_carries_the_link() {
        let from: Mailbox = "Turbocat <no-reply@example.com>".parse().unwrap();
        let link = "https://turbocat.example/reset-password?token=abc_DEF-123";
        let mail = PasswordResetMail {
            user_id: Uuid::new_v4(),
            email: "mia@example.com",
            reset_link: link,
            expires_in_minutes: 30,
        };
        let message = password_reset_message(&from, &mail).unwrap();
        let envelope = message.envelope();
        assert_eq!(envelope.to().len(), 1);
        assert_eq!(envelope.to()[0].to_string(), "mia@example.com");
        let text = String::from_utf8(message.formatted()).unwrap();
        assert!(text.contains(link), "{text}");
        assert!(text.contains("Subject: Reset your Turbocat password"), "{text}");
        let bad = PasswordResetMail { email: "not an address", ..mail };
        assert!(password_reset_message(&from, &bad).is_err());
    }
}
