//! Authentication: password hashing now; tokens, sessions and API keys with the auth issue.
//! May call: nothing but its crates (argon2 runs on the blocking pool).

pub mod password;
