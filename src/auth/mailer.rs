//! Mail the product sends: for now only password reset links. `LogMailer` writes them to the
//! log (the behaviour of `dev`, and the default until an SMTP mailer exists).
//! May call: nothing but `tracing`.

use async_trait::async_trait;
use uuid::Uuid;

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
/// the only place a reset token is ever logged, on purpose: in `dev` the log is the mailbox.
// TODO(auth): an SMTP mailer (lettre) selected by `--smtp-url`; until then `serve` logs too.
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
