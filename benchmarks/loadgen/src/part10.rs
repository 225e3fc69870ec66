//! Reading DICOM Part 10 files (PS3.10 7.1) just far enough to send them: the File Meta
//! Information (group 0002, always explicit VR little endian, PS3.10 7.1) is walked element
//! by element to find where the data set starts and to read the SOP Class UID (0002,0002),
//! SOP Instance UID (0002,0003) and Transfer Syntax UID (0002,0010). The data set itself is
//! never decoded: it is sent byte for byte.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

/// Length of the preamble that precedes the `DICM` prefix (PS3.10 7.1).
const PREAMBLE_LEN: usize = 128;
/// Offset of the first group 0002 element: preamble + "DICM".
const META_START: usize = PREAMBLE_LEN + 4;

/// One instance read from disk: the whole file, and where its data set starts.
#[derive(Debug)]
pub struct Instance {
    /// The whole file.
    bytes: Vec<u8>,
    /// Offset of the first byte after group 0002.
    dataset_offset: usize,
    /// (0002,0002) Media Storage SOP Class UID.
    pub sop_class_uid: String,
    /// (0002,0003) Media Storage SOP Instance UID.
    pub sop_instance_uid: String,
    /// (0002,0010) Transfer Syntax UID.
    pub transfer_syntax: String,
}

impl Instance {
    /// The data set bytes, exactly as stored after the file meta information.
    pub fn dataset(&self) -> &[u8] {
        self.bytes.get(self.dataset_offset..).unwrap_or(&[])
    }

    /// Size of the whole file.
    pub fn file_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Why a file could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part10Error {
    /// No `DICM` at offset 128.
    NotPart10,
    /// An element of group 0002 runs past the end of the file or has an undefined length.
    BadMeta(&'static str),
    /// One of the three mandatory UIDs is missing.
    Missing(&'static str),
}

impl fmt::Display for Part10Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotPart10 => write!(f, "not a DICOM Part 10 file (no DICM at offset 128)"),
            Self::BadMeta(what) => write!(f, "bad file meta information: {what}"),
            Self::Missing(what) => write!(f, "file meta information lacks {what}"),
        }
    }
}

impl std::error::Error for Part10Error {}

/// True if `bytes` carries the Part 10 prefix.
pub fn is_part10(bytes: &[u8]) -> bool {
    bytes.get(PREAMBLE_LEN..META_START) == Some(b"DICM".as_slice())
}

fn le16(bytes: &[u8], at: usize) -> Option<u16> {
    let b = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

fn le32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// A UID value without its padding (PS3.5 9.1: a trailing NUL; tolerate spaces too).
fn uid_value(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .trim_end_matches(['\0', ' '])
        .to_owned()
}

/// Walks group 0002 and returns (data set offset, SOP class, SOP instance, transfer syntax).
///
/// Explicit VR little endian (PS3.5 7.1.2): tag (4), VR (2), then either a 2-byte length, or
/// 2 reserved bytes and a 4-byte length for the VRs of PS3.5 Table 7.1-1.
pub fn parse_meta(bytes: &[u8]) -> Result<(usize, String, String, String), Part10Error> {
    if !is_part10(bytes) {
        return Err(Part10Error::NotPart10);
    }
    let mut at = META_START;
    let mut sop_class = None;
    let mut sop_instance = None;
    let mut syntax = None;
    while le16(bytes, at) == Some(0x0002) {
        let element = le16(bytes, at + 2).ok_or(Part10Error::BadMeta("truncated tag"))?;
        let vr = bytes
            .get(at + 4..at + 6)
            .ok_or(Part10Error::BadMeta("truncated VR"))?;
        let long = matches!(
            vr,
            b"OB"
                | b"OD"
                | b"OF"
                | b"OL"
                | b"OV"
                | b"OW"
                | b"SQ"
                | b"SV"
                | b"UC"
                | b"UN"
                | b"UR"
                | b"UT"
                | b"UV"
        );
        let (value_at, len) = if long {
            let len = le32(bytes, at + 8).ok_or(Part10Error::BadMeta("truncated length"))?;
            if len == u32::MAX {
                return Err(Part10Error::BadMeta("undefined length in group 0002"));
            }
            (at + 12, len as usize)
        } else {
            let len = le16(bytes, at + 6).ok_or(Part10Error::BadMeta("truncated length"))?;
            (at + 8, usize::from(len))
        };
        let end = value_at
            .checked_add(len)
            .filter(|&end| end <= bytes.len())
            .ok_or(Part10Error::BadMeta("value runs past the end of the file"))?;
        let value = &bytes[value_at..end];
        match element {
            0x0002 => sop_class = Some(uid_value(value)),
            0x0003 => sop_instance = Some(uid_value(value)),
            0x0010 => syntax = Some(uid_value(value)),
            _ => {}
        }
        at = end;
    }
    Ok((
        at,
        sop_class
            .filter(|s| !s.is_empty())
            .ok_or(Part10Error::Missing(
                "(0002,0002) Media Storage SOP Class UID",
            ))?,
        sop_instance
            .filter(|s| !s.is_empty())
            .ok_or(Part10Error::Missing(
                "(0002,0003) Media Storage SOP Instance UID",
            ))?,
        syntax
            .filter(|s| !s.is_empty())
            .ok_or(Part10Error::Missing("(0002,0010) Transfer Syntax UID"))?,
    ))
}

/// Reads one Part 10 file into memory.
pub fn read_instance(path: &Path) -> Result<Instance, String> {
    let bytes = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    instance_from_bytes(path.to_path_buf(), bytes)
}

/// Builds an [`Instance`] from file bytes already in memory.
pub fn instance_from_bytes(path: PathBuf, bytes: Vec<u8>) -> Result<Instance, String> {
    let (dataset_offset, sop_class_uid, sop_instance_uid, transfer_syntax) =
        parse_meta(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Instance {
        bytes,
        dataset_offset,
        sop_class_uid,
        sop_instance_uid,
        transfer_syntax,
    })
}

/// Expands the `--files` arguments into a sorted list of Part 10 file paths.
///
/// A directory is walked recursively and contributes every regular file that starts like a
/// Part 10 file (others, such as `corpus.json`, are skipped). A regular file that is a Part 10
/// file is taken as is; any other file is read as a list of paths, one per line (blank lines
/// and lines starting with `#` ignored).
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for input in inputs {
        let meta = fs::metadata(input).map_err(|e| format!("{}: {e}", input.display()))?;
        if meta.is_dir() {
            let mut found = Vec::new();
            walk_dir(input, &mut found)?;
            found.sort();
            out.extend(found);
        } else if starts_like_part10(input)? {
            out.push(input.clone());
        } else {
            let text =
                fs::read_to_string(input).map_err(|e| format!("{}: {e}", input.display()))?;
            let base = input.parent().unwrap_or(Path::new("."));
            for line in text.lines().map(str::trim) {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let path = Path::new(line);
                out.push(if path.is_absolute() {
                    path.to_path_buf()
                } else {
                    base.join(path)
                });
            }
        }
    }
    Ok(out)
}

fn starts_like_part10(path: &Path) -> Result<bool, String> {
    use std::io::Read;
    let mut head = [0u8; META_START];
    let mut file = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    Ok(filled == head.len() && is_part10(&head))
}

fn walk_dir(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let kind = entry
            .file_type()
            .map_err(|e| format!("{}: {e}", entry.path().display()))?;
        let path = entry.path();
        if kind.is_dir() {
            walk_dir(&path, out)?;
        } else if kind.is_file() && starts_like_part10(&path)? {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn element(out: &mut Vec<u8>, element: u16, vr: &[u8; 2], value: &[u8]) {
        out.extend_from_slice(&2u16.to_le_bytes());
        out.extend_from_slice(&element.to_le_bytes());
        out.extend_from_slice(vr);
        if vr == b"OB" {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(value);
    }

    /// A Part 10 file of a CT whose data set is 4 bytes.
    pub(crate) fn sample() -> Vec<u8> {
        let mut file = vec![0u8; 128];
        file.extend_from_slice(b"DICM");
        element(&mut file, 0x0000, b"UL", &60u32.to_le_bytes());
        element(&mut file, 0x0001, b"OB", &[0, 1]);
        element(&mut file, 0x0002, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0");
        element(&mut file, 0x0003, b"UI", b"1.2.3.4");
        element(&mut file, 0x0010, b"UI", b"1.2.840.10008.1.2.1\0");
        file.extend_from_slice(&[0x08, 0x00, 0x05, 0x00]);
        file
    }

    #[test]
    fn finds_dataset_and_uids() {
        let file = sample();
        let (offset, class, instance, syntax) = parse_meta(&file).unwrap_or_default();
        assert_eq!(class, "1.2.840.10008.5.1.4.1.1.2");
        assert_eq!(instance, "1.2.3.4");
        assert_eq!(syntax, "1.2.840.10008.1.2.1");
        assert_eq!(&file[offset..], &[0x08, 0x00, 0x05, 0x00]);
    }

    #[test]
    fn rejects_truncated_and_foreign_files() {
        let file = sample();
        assert_eq!(parse_meta(&file[..100]), Err(Part10Error::NotPart10));
        assert!(matches!(
            parse_meta(&file[..150]),
            Err(Part10Error::BadMeta(_))
        ));
    }
}
