//! Small text helpers shared by the server and the runner.
//! May call: nothing.

/// The first `max_chars` characters of `text`, with "…" when cut.
pub fn truncate_text(text: &str, max_chars: usize) -> String {
    let mut characters = text.char_indices();
    match characters.nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}
