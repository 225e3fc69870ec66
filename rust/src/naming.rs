//! UID validation and the storage file layout (SPEC.md section 4).
//!
//! Every path component of a stored file comes from this module, and only from values that
//! passed [`validate_uid`] (PS3.5 section 9.1: a UID is at most 64 characters of digits and
//! dots, made of non-empty components) or [`is_valid_date`] (PS3.5 section 6.2, VR DA).
//! A validated UID contains neither `/`, `\`, NUL nor `..`, so no input can name a file
//! outside the storage directory.

use std::fmt;

/// Maximum length of a UID (PS3.5 section 9.1, VR UI).
pub const MAX_UID_LEN: usize = 64;

/// Folder layout of stored files under the storage root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// `{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm`
    Hierarchical,
    /// `YYYY/MM/DD/{StudyInstanceUID}/{SOPInstanceUID}.dcm`
    Date,
    /// `{SOPInstanceUID}.dcm`
    Flat,
}

impl Naming {
    /// Parses the command-line spelling: `hierarchical`, `date` or `flat` (exact, lower case).
    pub fn parse(s: &str) -> Option<Naming> {
        match s {
            "hierarchical" => Some(Naming::Hierarchical),
            "date" => Some(Naming::Date),
            "flat" => Some(Naming::Flat),
            _ => None,
        }
    }

    /// The command-line spelling of this layout (inverse of [`Naming::parse`]).
    pub fn as_str(self) -> &'static str {
        match self {
            Naming::Hierarchical => "hierarchical",
            Naming::Date => "date",
            Naming::Flat => "flat",
        }
    }
}

/// Why a data set cannot be given a file name. `Display` is a sentence usable as a DICOM
/// Error Comment (0000,0902); it never contains a backslash or control character.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamingError {
    /// The attribute (e.g. `"Study Instance UID"`) is absent or empty.
    MissingUid(&'static str),
    /// The attribute is present but is not a valid UID; `value` is the value with its
    /// trailing NUL/space padding removed.
    InvalidUid {
        /// Attribute name, e.g. `"SOP Instance UID"`.
        attribute: &'static str,
        /// The offending value (padding removed).
        value: String,
    },
}

impl fmt::Display for NamingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamingError::MissingUid(attribute) => write!(f, "missing {attribute}"),
            NamingError::InvalidUid { attribute, value } => {
                write!(f, "invalid {attribute} \"")?;
                write_sanitized(f, value, 24)?;
                write!(f, "\": {}", uid_problem(value).unwrap_or("not a valid UID"))
            }
        }
    }
}

impl std::error::Error for NamingError {}

/// Writes at most `max` characters of `value`, replacing anything but printable ASCII
/// (and the backslash, which is the DICOM value delimiter) with `?`.
fn write_sanitized(f: &mut fmt::Formatter<'_>, value: &str, max: usize) -> fmt::Result {
    use fmt::Write;
    for (i, c) in value.chars().enumerate() {
        if i == max {
            return f.write_str("...");
        }
        let shown = if (' '..='~').contains(&c) && c != '\\' {
            c
        } else {
            '?'
        };
        f.write_char(shown)?;
    }
    Ok(())
}

/// Describes what is wrong with a (padding-trimmed) UID, or `None` when it is valid.
fn uid_problem(uid: &str) -> Option<&'static str> {
    if uid.is_empty() {
        return Some("empty");
    }
    for b in uid.bytes() {
        match b {
            b'0'..=b'9' | b'.' => {}
            b'/' => return Some("contains a slash"),
            b'\\' => return Some("contains a backslash"),
            0 => return Some("contains a NUL"),
            b' ' => return Some("contains a space"),
            _ => return Some("only digits and dots are allowed"),
        }
    }
    if uid.len() > MAX_UID_LEN {
        return Some("longer than 64 characters");
    }
    if uid.starts_with('.') || uid.ends_with('.') || uid.contains("..") {
        return Some("empty component");
    }
    None
}

/// Removes the trailing NUL and space padding of a DICOM value.
fn trim_padding(value: &str) -> &str {
    value.trim_end_matches(['\0', ' '])
}

/// Validates a UID taken from a data set and returns it without its trailing NUL/space
/// padding.
///
/// Valid means 1..=64 characters, only digits and `.`, no empty component (no leading or
/// trailing dot, no `..`). `None` or an empty value (after trimming) is
/// [`NamingError::MissingUid`]; anything else invalid is [`NamingError::InvalidUid`].
/// The result is safe to use as a single path component.
pub fn validate_uid<'a>(
    attribute: &'static str,
    value: Option<&'a str>,
) -> Result<&'a str, NamingError> {
    let trimmed = match value.map(trim_padding) {
        None | Some("") => return Err(NamingError::MissingUid(attribute)),
        Some(v) => v,
    };
    match uid_problem(trimmed) {
        None => Ok(trimmed),
        Some(_) => Err(NamingError::InvalidUid {
            attribute,
            value: trimmed.to_owned(),
        }),
    }
}

/// True if `yyyymmdd` is exactly 8 ASCII digits forming a real calendar date of the
/// Gregorian calendar (leap years included), with year 1..=9999.
pub fn is_valid_date(yyyymmdd: &str) -> bool {
    let b = yyyymmdd.as_bytes();
    if b.len() != 8 || !b.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let num = |s: &[u8]| s.iter().fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
    let (year, month, day) = (num(&b[0..4]), num(&b[4..6]), num(&b[6..8]));
    if year == 0 || !(1..=12).contains(&month) || day == 0 {
        return false;
    }
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    day <= days
}

/// Relative path of a stored instance under the storage root, `/`-separated, with the
/// validated SOP Instance UID it names.
///
/// - [`Naming::Hierarchical`] gives `{study}/{series}/{sop}.dcm`
/// - [`Naming::Date`] gives `YYYY/MM/DD/{study}/{sop}.dcm`, the date taken from `study_date`
///   (trailing/leading spaces and NULs ignored) when it is a valid date, else from `today`
///   (`YYYYMMDD`, the local reception date supplied by the caller; if that is not a valid
///   date either, `0000/00/00` is used so that the path stays well formed).
/// - [`Naming::Flat`] gives `{sop}.dcm`
///
/// The Study, Series and SOP Instance UIDs are validated whatever the layout, in that
/// order; the first failure is returned.
pub fn relative_path<'a>(
    naming: Naming,
    study: Option<&str>,
    series: Option<&str>,
    sop: Option<&'a str>,
    study_date: Option<&str>,
    today: &str,
) -> Result<RelativePath<'a>, NamingError> {
    let study = validate_uid("Study Instance UID", study)?;
    let series = validate_uid("Series Instance UID", series)?;
    let sop = validate_uid("SOP Instance UID", sop)?;
    let path = match naming {
        Naming::Hierarchical => format!("{study}/{series}/{sop}.dcm"),
        Naming::Flat => format!("{sop}.dcm"),
        Naming::Date => {
            let date = study_date
                .map(|d| d.trim_matches(['\0', ' ']))
                .filter(|d| is_valid_date(d))
                .or(Some(today).filter(|d| is_valid_date(d)))
                .unwrap_or("00000000");
            // `date` is 8 ASCII digits here, so these byte ranges are char boundaries.
            let (y, m, d) = (
                date.get(0..4).unwrap_or("0000"),
                date.get(4..6).unwrap_or("00"),
                date.get(6..8).unwrap_or("00"),
            );
            format!("{y}/{m}/{d}/{study}/{sop}.dcm")
        }
    };
    Ok(RelativePath {
        path,
        sop_instance_uid: sop,
    })
}

/// A stored instance's path under the storage root, with the SOP Instance UID it was
/// made from, validated and without its padding: the key of the duplicate decision.
#[derive(Debug)]
pub struct RelativePath<'a> {
    /// `/`-separated, relative to the storage root.
    pub path: String,
    /// Borrowed from the caller's value, without its trailing padding.
    pub sop_instance_uid: &'a str,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const A: &str = "Study Instance UID";

    #[test]
    fn naming_parse() {
        assert_eq!(Naming::parse("hierarchical"), Some(Naming::Hierarchical));
        assert_eq!(Naming::parse("date"), Some(Naming::Date));
        assert_eq!(Naming::parse("flat"), Some(Naming::Flat));
        assert_eq!(Naming::parse("Flat"), None);
        assert_eq!(Naming::parse(""), None);
        for n in [Naming::Hierarchical, Naming::Date, Naming::Flat] {
            assert_eq!(Naming::parse(n.as_str()), Some(n));
        }
    }

    #[test]
    fn valid_uids() {
        assert_eq!(validate_uid(A, Some("1.2.3")), Ok("1.2.3"));
        assert_eq!(validate_uid(A, Some("1.2.3\0")), Ok("1.2.3"));
        assert_eq!(validate_uid(A, Some("1.2.3 ")), Ok("1.2.3"));
        assert_eq!(validate_uid(A, Some("1.2.3\0 \0")), Ok("1.2.3"));
        assert_eq!(validate_uid(A, Some("0")), Ok("0"));
        let max = format!("1.{}", "2".repeat(62));
        assert_eq!(max.len(), 64);
        assert_eq!(validate_uid(A, Some(&max)), Ok(max.as_str()));
        // 64 characters plus padding is still valid.
        let padded = format!("{max}\0");
        assert_eq!(validate_uid(A, Some(&padded)), Ok(max.as_str()));
    }

    fn invalid(v: &str) -> NamingError {
        let e = validate_uid(A, Some(v)).unwrap_err();
        assert!(matches!(e, NamingError::InvalidUid { .. }), "{v:?}: {e:?}");
        e
    }

    #[test]
    fn invalid_uids() {
        for v in [
            "..",
            "../x",
            "1..2",
            ".1.2",
            "1.2.",
            "1/2",
            "/1.2",
            "1\\2",
            "1\x002",
            "\x001.2",
            "1.2.a",
            "abc",
            " 1.2",
            "1 .2",
            "1.2\n",
            "1.2\u{e9}",
            "-1.2",
            "1.2\u{0}x",
        ] {
            invalid(v);
        }
        let long = format!("1.{}", "2".repeat(63));
        assert_eq!(long.len(), 65);
        invalid(&long);
    }

    #[test]
    fn missing_uids() {
        for v in [None, Some(""), Some("\0"), Some("  "), Some(" \0")] {
            assert_eq!(validate_uid(A, v), Err(NamingError::MissingUid(A)));
        }
    }

    #[test]
    fn error_messages_are_error_comments() {
        let e = invalid("../x");
        let s = e.to_string();
        assert!(
            s.starts_with("invalid Study Instance UID \"../x\": "),
            "{s}"
        );
        for v in ["1\\2", "1\x002", "1.2\u{e9}", &"9".repeat(200)] {
            let s = invalid(v).to_string();
            assert!(
                s.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'\\'),
                "{s}"
            );
            assert!(s.len() < 120, "{s}");
        }
        assert_eq!(
            NamingError::MissingUid("Series Instance UID").to_string(),
            "missing Series Instance UID"
        );
    }

    #[test]
    fn dates() {
        for d in [
            "20240229", "20000229", "00010101", "99991231", "20230131", "19700101",
        ] {
            assert!(is_valid_date(d), "{d}");
        }
        for d in [
            "20230229",
            "19000229",
            "00000101",
            "20231301",
            "20230001",
            "20230100",
            "20230431",
            "2023022",
            "202302299",
            "2023-02-",
            "2023022a",
            "",
            "２０２３０１０１",
            " 2023010",
        ] {
            assert!(!is_valid_date(d), "{d}");
        }
    }

    #[test]
    fn layouts() {
        let (st, se, so) = (Some("1.2.3"), Some("1.2.3.4\0"), Some("1.2.3.4.5"));
        let p =
            |n, date: Option<&str>| relative_path(n, st, se, so, date, "20250102").map(|r| r.path);
        assert_eq!(
            p(Naming::Hierarchical, None).unwrap(),
            "1.2.3/1.2.3.4/1.2.3.4.5.dcm"
        );
        assert_eq!(p(Naming::Flat, None).unwrap(), "1.2.3.4.5.dcm");
        assert_eq!(
            p(Naming::Date, Some("20240229")).unwrap(),
            "2024/02/29/1.2.3/1.2.3.4.5.dcm"
        );
        assert_eq!(
            p(Naming::Date, Some("20240229 ")).unwrap(),
            "2024/02/29/1.2.3/1.2.3.4.5.dcm"
        );
        for bad in [
            None,
            Some("20230229"),
            Some(""),
            Some("../../x"),
            Some("2024"),
        ] {
            assert_eq!(
                p(Naming::Date, bad).unwrap(),
                "2025/01/02/1.2.3/1.2.3.4.5.dcm"
            );
        }
        // A bad `today` still gives a well-formed path.
        assert_eq!(
            relative_path(Naming::Date, st, se, so, None, "x")
                .unwrap()
                .path,
            "0000/00/00/1.2.3/1.2.3.4.5.dcm"
        );
    }

    #[test]
    fn layouts_validate_all_uids_in_order() {
        for n in [Naming::Hierarchical, Naming::Date, Naming::Flat] {
            let r = |a, b, c| relative_path(n, a, b, c, None, "20250102").map(|r| r.path);
            assert_eq!(
                r(None, None, None),
                Err(NamingError::MissingUid("Study Instance UID"))
            );
            assert_eq!(
                r(Some("1"), None, None),
                Err(NamingError::MissingUid("Series Instance UID"))
            );
            assert_eq!(
                r(Some("1"), Some("2"), None),
                Err(NamingError::MissingUid("SOP Instance UID"))
            );
            assert_eq!(
                r(Some("1"), Some("../2"), Some("x")),
                Err(NamingError::InvalidUid {
                    attribute: "Series Instance UID",
                    value: "../2".into()
                })
            );
            assert!(matches!(
                r(Some("1"), Some("2"), Some("3/..")),
                Err(NamingError::InvalidUid {
                    attribute: "SOP Instance UID",
                    ..
                })
            ));
        }
    }
}
