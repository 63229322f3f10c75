//! Input checks at the service boundary. A `Validator` collects every bad field, so the caller
//! learns about all of them at once.

use crate::error::{FieldError, ServiceError, ServiceResult};
use crate::store::{PageRequest, SortOrder};

/// The longest email address (RFC 5321 path limit).
pub const MAX_EMAIL_CHARS: usize = 254;
/// The longest name of anything.
pub const MAX_NAME_CHARS: usize = 200;
/// The longest description of anything.
pub const MAX_DESCRIPTION_CHARS: usize = 5_000;

/// Collects field errors; `finish` turns them into one VALIDATION_ERROR.
#[derive(Debug, Default)]
pub struct Validator {
    errors: Vec<FieldError>,
}

impl Validator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn error(&mut self, field: &str, message: impl Into<String>) -> &mut Self {
        self.errors.push(FieldError::new(field, message));
        self
    }

    /// A required text of at most `max_chars` characters (after trimming), on one line and
    /// without control characters (a name).
    pub fn required_text(&mut self, field: &str, value: &str, max_chars: usize) -> &mut Self {
        if value.trim().is_empty() {
            return self.error(field, "is required");
        }
        if value.chars().any(char::is_control) {
            return self.error(field, "must not contain control characters or line breaks");
        }
        self.max_chars(field, value, max_chars)
    }

    /// A text of at most `max_chars` characters, without NUL characters (no database stores
    /// them).
    pub fn max_chars(&mut self, field: &str, value: &str, max_chars: usize) -> &mut Self {
        if value.contains('\0') {
            return self.error(field, "must not contain NUL characters");
        }
        if value.chars().count() > max_chars {
            return self.error(field, format!("must be at most {max_chars} characters"));
        }
        self
    }

    /// A plausible email address: one `@`, something on both sides, a dot in the domain.
    pub fn email(&mut self, field: &str, value: &str) -> &mut Self {
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return self.error(field, "is required");
        }
        if trimmed.chars().count() > MAX_EMAIL_CHARS {
            return self.error(field, format!("must be at most {MAX_EMAIL_CHARS} characters"));
        }
        let valid = match trimmed.split_once('@') {
            Some((local, domain)) => {
                !local.is_empty()
                    && !domain.contains('@')
                    && domain.contains('.')
                    && !domain.starts_with('.')
                    && !domain.ends_with('.')
                    && !trimmed.chars().any(char::is_whitespace)
            }
            None => false,
        };
        if !valid {
            return self.error(field, "is not an email address");
        }
        self
    }

    /// A password within the allowed length.
    pub fn password(&mut self, field: &str, value: &str) -> &mut Self {
        use crate::auth::password::{MAX_PASSWORD_CHARS, MIN_PASSWORD_CHARS};
        let length = value.chars().count();
        if length < MIN_PASSWORD_CHARS {
            return self.error(field, format!("must be at least {MIN_PASSWORD_CHARS} characters"));
        }
        if length > MAX_PASSWORD_CHARS {
            return self.error(field, format!("must be at most {MAX_PASSWORD_CHARS} characters"));
        }
        self
    }

    /// Refuses a JSON value nested deeper than `max_depth` (`--max-json-depth`): such values
    /// cannot cross the transport to a runner and back.
    pub fn json_depth(
        &mut self,
        field: &str,
        value: &serde_json::Value,
        max_depth: usize,
    ) -> &mut Self {
        let depth = crate::proto::wkt::json_depth(value);
        if depth > max_depth {
            self.error(
                field,
                format!("is nested {depth} levels deep, deeper than the limit of {max_depth}"),
            );
        }
        self
    }

    pub fn finish(&mut self) -> ServiceResult<()> {
        if self.errors.is_empty() {
            return Ok(());
        }
        Err(ServiceError::validation(std::mem::take(&mut self.errors)))
    }
}

/// Reads the page and page size of a numbered list: page from 1, page size 1 to 100; absent
/// means page 1 of 20. Bad values (0 included) are added to `validator`.
pub fn page_request(
    validator: &mut Validator,
    page: Option<i32>,
    page_size: Option<i32>,
) -> PageRequest {
    let mut request = PageRequest::default();
    if let Some(page) = page {
        match u32::try_from(page) {
            Ok(number) if number >= 1 => request.page = number,
            _ => {
                validator.error("page", "must be 1 or more");
            }
        }
    }
    if let Some(page_size) = page_size {
        match u32::try_from(page_size) {
            Ok(size) if (1..=PageRequest::MAX_PAGE_SIZE).contains(&size) => {
                request.page_size = size;
            }
            _ => {
                validator.error(
                    "pageSize",
                    format!("must be between 1 and {}", PageRequest::MAX_PAGE_SIZE),
                );
            }
        }
    }
    request
}

/// The page size of a cursor-paged list: 1 to 100, absent means `default`.
pub fn cursor_page_size(validator: &mut Validator, page_size: Option<i32>, default: u32) -> u32 {
    match page_size {
        None => default,
        Some(size) => match u32::try_from(size) {
            Ok(size) if (1..=PageRequest::MAX_PAGE_SIZE).contains(&size) => size,
            _ => {
                validator.error(
                    "pageSize",
                    format!("must be between 1 and {}", PageRequest::MAX_PAGE_SIZE),
                );
                default
            }
        },
    }
}

/// Reads a sort text such as `name` or `-updatedAt` against a resource's allowlist of JSON
/// field names; an empty text means the resource's default order (`None`). A name outside the
/// allowlist is a `sort` error listing the allowed ones.
pub fn sort_order<F: Copy>(
    validator: &mut Validator,
    sort: &str,
    allowed: &[(&str, F)],
) -> Option<SortOrder<F>> {
    let trimmed = sort.trim();
    if trimmed.is_empty() {
        return None;
    }
    let (descending, name) = match trimmed.strip_prefix('-') {
        Some(name) => (true, name),
        None => (false, trimmed),
    };
    if let Some((_, field)) = allowed.iter().find(|(allowed_name, _)| *allowed_name == name) {
        return Some(SortOrder { field: *field, descending });
    }
    let names: Vec<&str> = allowed.iter().map(|(allowed_name, _)| *allowed_name).collect();
    validator
        .error("sort", format!("must be one of {}, optionally with a leading -", names.join(", ")));
    None
}

/// Reads an update mask against a resource's table of updatable fields (JSON name, field), in
/// the order the fields are checked. A path may be the JSON name (`defaultInput`) or the proto
/// name (`default_input`), and one path may list several names separated by commas. Each name
/// outside the table is an error on that name (in its JSON spelling); a mask that names
/// nothing is an `updateMask` error. Returns the named fields in table order, each once.
pub fn update_mask_fields<F: Copy>(
    validator: &mut Validator,
    mask: Option<prost_types::FieldMask>,
    updatable: &[(&str, F)],
) -> Vec<F> {
    let paths = mask.map(|mask| mask.paths).unwrap_or_default();
    let names: Vec<String> = paths
        .iter()
        .flat_map(|path| path.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(lower_camel_case)
        .collect();
    let updatable_names: Vec<&str> = updatable.iter().map(|(name, _)| *name).collect();
    if names.is_empty() {
        validator.error(
            "updateMask",
            format!("must name at least one of {}", updatable_names.join(", ")),
        );
    }
    for name in &names {
        if !updatable_names.contains(&name.as_str()) {
            validator.error(
                name,
                format!(
                    "cannot be changed; the changeable fields are {}",
                    updatable_names.join(", ")
                ),
            );
        }
    }
    updatable
        .iter()
        .filter(|(updatable_name, _)| names.iter().any(|name| name == updatable_name))
        .map(|(_, field)| *field)
        .collect()
}

/// `owner_id` -> `ownerId`: a proto field name in its JSON spelling (field names in errors are
/// the JSON names). A name already in lowerCamelCase is returned as it is.
pub fn lower_camel_case(path: &str) -> String {
    let mut name = String::with_capacity(path.len());
    let mut upper_next = false;
    for character in path.chars() {
        if character == '_' {
            upper_next = true;
        } else if upper_next {
            name.extend(character.to_uppercase());
            upper_next = false;
        } else {
            name.push(character);
        }
    }
    name
}

/// The most tags a resource may carry.
pub const MAX_TAGS: usize = 20;
/// The longest tag.
pub const MAX_TAG_CHARS: usize = 50;

/// Tags of a resource: each non-empty and at most `MAX_TAG_CHARS`, at most `MAX_TAGS`; trimmed,
/// duplicates dropped (the first kept). Bad ones are added to `validator` as `tags[i]`.
pub fn tags(validator: &mut Validator, tags: &[String]) -> Vec<String> {
    if tags.len() > MAX_TAGS {
        validator.error("tags", format!("must be at most {MAX_TAGS} tags"));
    }
    let mut kept: Vec<String> = Vec::with_capacity(tags.len());
    for (index, tag) in tags.iter().enumerate() {
        let trimmed = tag.trim();
        let field = format!("tags[{index}]");
        if trimmed.is_empty() {
            validator.error(&field, "must not be empty");
        } else if trimmed.chars().count() > MAX_TAG_CHARS {
            validator.error(&field, format!("must be at most {MAX_TAG_CHARS} characters"));
        } else if !kept.iter().any(|existing| existing == trimmed) {
            kept.push(trimmed.to_owned());
        }
    }
    kept
}

/// An optional id field (a filter, a reference): empty is `None`, a malformed id an error on
/// `field`.
pub fn optional_id(validator: &mut Validator, field: &str, value: &str) -> Option<uuid::Uuid> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return None;
    }
    match uuid::Uuid::parse_str(trimmed) {
        Ok(id) => Some(id),
        Err(_) => {
            validator.error(field, "is not a valid id");
            None
        }
    }
}

/// Parses an id field; a malformed id is a VALIDATION_ERROR naming the field.
pub fn parse_id(field: &str, value: &str) -> ServiceResult<uuid::Uuid> {
    uuid::Uuid::parse_str(value.trim())
        .map_err(|_| ServiceError::invalid_field(field, "is not a valid id"))
}

#[cfg(test)]
mod tests {
    use super::Validator;

    #[test]
    fn tags_are_trimmed_deduplicated_and_bounded() {
        let fields = |validator: &mut Validator| -> Vec<String> {
            validator
                .finish()
                .err()
                .map(|error| error.field_errors.iter().map(|e| e.field.clone()).collect())
                .unwrap_or_default()
        };
        let mut validator = Validator::new();
        let tags = super::tags(&mut validator, &[" a ".into(), "a".into(), "b".into()]);
        assert_eq!(tags, vec!["a", "b"]);
        assert!(fields(&mut validator).is_empty());
        let too_many: Vec<String> =
            (0..=super::MAX_TAGS).map(|index| format!("t{index}")).collect();
        super::tags(&mut validator, &too_many);
        assert_eq!(fields(&mut validator), vec!["tags"]);
        super::tags(
            &mut validator,
            &["ok".into(), " ".into(), "x".repeat(super::MAX_TAG_CHARS + 1)],
        );
        assert_eq!(fields(&mut validator), vec!["tags[1]", "tags[2]"]);
        assert_eq!(super::optional_id(&mut validator, "id", " "), None);
        assert!(super::optional_id(&mut validator, "id", "nope").is_none());
        assert_eq!(fields(&mut validator), vec!["id"]);
    }

    #[test]
    fn update_masks_name_known_fields_in_either_spelling() {
        const FIELDS: &[(&str, u8)] = &[("name", 1), ("defaultInput", 2), ("tags", 3)];
        let mask = |paths: &[&str]| {
            Some(prost_types::FieldMask {
                paths: paths.iter().map(|path| (*path).into()).collect(),
            })
        };
        let mut validator = Validator::new();
        let fields = super::update_mask_fields(
            &mut validator,
            mask(&["tags", "default_input", " name ", "tags"]),
            FIELDS,
        );
        assert_eq!(fields, vec![1, 2, 3], "table order, each once");
        assert!(validator.finish().is_ok());
        let fields =
            super::update_mask_fields(&mut validator, mask(&["tags,defaultInput"]), FIELDS);
        assert_eq!(fields, vec![2, 3], "a path may list several names");
        assert!(validator.finish().is_ok());

        let fields =
            super::update_mask_fields(&mut validator, mask(&["owner_id", "name", "id"]), FIELDS);
        assert_eq!(fields, vec![1]);
        let error = validator.finish().expect_err("unknown fields");
        let reported: Vec<(&str, &str)> = error
            .field_errors
            .iter()
            .map(|field| (field.field.as_str(), field.message.as_str()))
            .collect();
        let message = "cannot be changed; the changeable fields are name, defaultInput, tags";
        assert_eq!(reported, vec![("ownerId", message), ("id", message)]);

        for empty in [None, mask(&[]), mask(&["", " , "])] {
            assert!(super::update_mask_fields(&mut validator, empty, FIELDS).is_empty());
            let error = validator.finish().expect_err("an empty mask");
            assert_eq!(error.field_errors.len(), 1);
            assert_eq!(error.field_errors[0].field, "updateMask");
            assert_eq!(
                error.field_errors[0].message,
                "must name at least one of name, defaultInput, tags"
            );
        }
        assert_eq!(super::lower_camel_case("last_login_at"), "lastLoginAt");
        assert_eq!(super::lower_camel_case("fullName"), "fullName");
    }

    #[test]
    fn every_bad_field_is_reported() {
        let error = Validator::new()
            .email("email", "not-an-email")
            .password("password", "short")
            .required_text("fullName", "  ", 200)
            .max_chars("description", &"x".repeat(5_001), 5_000)
            .finish()
            .expect_err("four problems");
        let fields: Vec<&str> =
            error.field_errors.iter().map(|field| field.field.as_str()).collect();
        assert_eq!(fields, vec!["email", "password", "fullName", "description"]);
        assert!(
            Validator::new()
                .email("email", "ann@example.com")
                .password("p", "12345678")
                .finish()
                .is_ok()
        );
        for bad in ["a@b", "@example.com", "a b@example.com", "a@@example.com", "a@.com"] {
            assert!(Validator::new().email("email", bad).finish().is_err(), "{bad}");
        }
        let long_email = format!("{}@example.com", "a".repeat(250));
        assert!(Validator::new().email("email", &long_email).finish().is_err());
        assert!(Validator::new().password("p", &"x".repeat(129)).finish().is_err());
    }
}
