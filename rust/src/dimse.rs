//! DIMSE command sets: parsing requests and encoding responses (PS3.7 section 9.3 and
//! annex E; C-STORE 9.3.1, C-ECHO 9.3.5).
//!
//! A command set is group 0000 only, always encoded in implicit VR little endian whatever
//! the negotiated transfer syntax (PS3.7 section 6.3.1): tag (2 x u16 LE), 4-byte LE value
//! length, value. Encoded command sets start with (0000,0000) Command Group Length and list
//! their elements in ascending tag order.

use std::fmt;

/// Command Field (0000,0100) values (PS3.7 annex E.1).
pub mod command_field {
    /// C-STORE request.
    pub const C_STORE_RQ: u16 = 0x0001;
    /// C-STORE response.
    pub const C_STORE_RSP: u16 = 0x8001;
    /// C-GET request.
    pub const C_GET_RQ: u16 = 0x0010;
    /// C-GET response.
    pub const C_GET_RSP: u16 = 0x8010;
    /// C-FIND request.
    pub const C_FIND_RQ: u16 = 0x0020;
    /// C-FIND response.
    pub const C_FIND_RSP: u16 = 0x8020;
    /// C-MOVE request.
    pub const C_MOVE_RQ: u16 = 0x0021;
    /// C-MOVE response.
    pub const C_MOVE_RSP: u16 = 0x8021;
    /// C-ECHO request.
    pub const C_ECHO_RQ: u16 = 0x0030;
    /// C-ECHO response.
    pub const C_ECHO_RSP: u16 = 0x8030;
    /// N-EVENT-REPORT request.
    pub const N_EVENT_REPORT_RQ: u16 = 0x0100;
    /// N-EVENT-REPORT response.
    pub const N_EVENT_REPORT_RSP: u16 = 0x8100;
    /// N-GET request.
    pub const N_GET_RQ: u16 = 0x0110;
    /// N-GET response.
    pub const N_GET_RSP: u16 = 0x8110;
    /// N-SET request.
    pub const N_SET_RQ: u16 = 0x0120;
    /// N-SET response.
    pub const N_SET_RSP: u16 = 0x8120;
    /// N-ACTION request.
    pub const N_ACTION_RQ: u16 = 0x0130;
    /// N-ACTION response.
    pub const N_ACTION_RSP: u16 = 0x8130;
    /// N-CREATE request.
    pub const N_CREATE_RQ: u16 = 0x0140;
    /// N-CREATE response.
    pub const N_CREATE_RSP: u16 = 0x8140;
    /// N-DELETE request.
    pub const N_DELETE_RQ: u16 = 0x0150;
    /// N-DELETE response.
    pub const N_DELETE_RSP: u16 = 0x8150;
    /// C-CANCEL request (C-FIND, C-GET, C-MOVE cancel); it has no response.
    pub const C_CANCEL_RQ: u16 = 0x0FFF;

    /// The DIMSE name of a command field value, e.g. `"C-STORE-RQ"`, or `None` if unknown.
    pub fn name(command_field: u16) -> Option<&'static str> {
        Some(match command_field {
            C_STORE_RQ => "C-STORE-RQ",
            C_STORE_RSP => "C-STORE-RSP",
            C_GET_RQ => "C-GET-RQ",
            C_GET_RSP => "C-GET-RSP",
            C_FIND_RQ => "C-FIND-RQ",
            C_FIND_RSP => "C-FIND-RSP",
            C_MOVE_RQ => "C-MOVE-RQ",
            C_MOVE_RSP => "C-MOVE-RSP",
            C_ECHO_RQ => "C-ECHO-RQ",
            C_ECHO_RSP => "C-ECHO-RSP",
            N_EVENT_REPORT_RQ => "N-EVENT-REPORT-RQ",
            N_EVENT_REPORT_RSP => "N-EVENT-REPORT-RSP",
            N_GET_RQ => "N-GET-RQ",
            N_GET_RSP => "N-GET-RSP",
            N_SET_RQ => "N-SET-RQ",
            N_SET_RSP => "N-SET-RSP",
            N_ACTION_RQ => "N-ACTION-RQ",
            N_ACTION_RSP => "N-ACTION-RSP",
            N_CREATE_RQ => "N-CREATE-RQ",
            N_CREATE_RSP => "N-CREATE-RSP",
            N_DELETE_RQ => "N-DELETE-RQ",
            N_DELETE_RSP => "N-DELETE-RSP",
            C_CANCEL_RQ => "C-CANCEL-RQ",
            _ => return None,
        })
    }

    /// True for a response command field (bit 15 set, PS3.7 annex E.1).
    pub fn is_response(command_field: u16) -> bool {
        command_field & 0x8000 != 0
    }
}

/// Status (0000,0900) values used by this server (PS3.7 annex C and section 9.1.1.1.9).
pub mod status {
    /// Success.
    pub const SUCCESS: u16 = 0x0000;
    /// Warning: Duplicate SOP Instance (PS3.7 annex C.5.7; used as the `reject` outcome).
    pub const DUPLICATE_SOP_INSTANCE: u16 = 0x0111;
    /// Failure: No Such SOP Class (PS3.7 annex C.5.6).
    pub const NO_SUCH_SOP_CLASS: u16 = 0x0118;
    /// Failure: Unrecognized Operation (PS3.7 annex C.5.14).
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    /// Failure: Refused, Out of Resources (C-STORE, PS3.4 B.2.3), A7xx range.
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Failure: Error, Data Set Does Not Match SOP Class (C-STORE), A9xx range.
    pub const DATA_SET_DOES_NOT_MATCH_SOP_CLASS: u16 = 0xA900;
    /// Failure: Error, Cannot Understand (C-STORE), Cxxx range.
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
}

/// Command Data Set Type (0000,0800) value meaning "no data set follows" (PS3.7 E.1).
pub const NO_DATA_SET: u16 = 0x0101;
/// Command Data Set Type value this module writes in requests that carry a data set (any
/// value other than [`NO_DATA_SET`] means one follows).
pub const DATA_SET_PRESENT: u16 = 0x0001;
/// Verification SOP Class UID (PS3.4 annex A.4), the Affected SOP Class of C-ECHO.
pub const VERIFICATION_SOP_CLASS: &str = "1.2.840.10008.1.1";
/// Priority (0000,0700) MEDIUM (PS3.7 annex E.1).
pub const PRIORITY_MEDIUM: u16 = 0x0000;
/// Maximum characters of an Error Comment (0000,0902), VR LO.
pub const MAX_ERROR_COMMENT: usize = 64;

/// The command set elements this server uses (PS3.7 annex E.1). Other elements are
/// skipped by the parser.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Command {
    /// (0000,0100) Command Field, see [`command_field`].
    pub command_field: u16,
    /// (0000,0110) Message ID (0 if absent).
    pub message_id: u16,
    /// (0000,0120) Message ID Being Responded To.
    pub message_id_being_responded_to: Option<u16>,
    /// (0000,0002) Affected SOP Class UID, padding removed (`None` if absent or empty).
    pub affected_sop_class_uid: Option<String>,
    /// (0000,1000) Affected SOP Instance UID, padding removed (`None` if absent or empty).
    pub affected_sop_instance_uid: Option<String>,
    /// (0000,0700) Priority (0 = MEDIUM if absent).
    pub priority: u16,
    /// (0000,0800) Command Data Set Type; [`NO_DATA_SET`] means no data set follows.
    pub data_set_type: u16,
    /// (0000,0900) Status (responses only).
    pub status: Option<u16>,
    /// (0000,1030) Move Originator Application Entity Title, spaces trimmed.
    pub move_originator_ae: Option<String>,
    /// (0000,1031) Move Originator Message ID.
    pub move_originator_message_id: Option<u16>,
}

impl Command {
    /// True if a data set follows this command (Command Data Set Type is not 0x0101).
    pub fn has_data_set(&self) -> bool {
        self.data_set_type != NO_DATA_SET
    }
}

/// Why a command set could not be parsed. `Display` is usable as an Error Comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DimseError {
    /// The command set ends in the middle of an element header or value.
    Truncated {
        /// Byte offset of the element that is cut.
        offset: usize,
    },
    /// An element has undefined length (0xFFFFFFFF), not allowed in a command set.
    UndefinedLength {
        /// Tag as `(group << 16) | element`.
        tag: u32,
    },
    /// A US element whose value length is not 2.
    BadValueLength {
        /// Tag as `(group << 16) | element`.
        tag: u32,
        /// The value length found.
        length: u32,
    },
    /// A required element is absent.
    MissingElement {
        /// Tag as `(group << 16) | element`.
        tag: u32,
        /// Element name, e.g. `"Command Field"`.
        name: &'static str,
    },
}

impl fmt::Display for DimseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = |tag: u32| format!("({:04X},{:04X})", tag >> 16, tag & 0xFFFF);
        match self {
            DimseError::Truncated { offset } => {
                write!(f, "command set truncated in element at offset {offset}")
            }
            DimseError::UndefinedLength { tag } => {
                write!(f, "command element {} has undefined length", t(*tag))
            }
            DimseError::BadValueLength { tag, length } => {
                write!(
                    f,
                    "command element {} has length {length}, expected 2",
                    t(*tag)
                )
            }
            DimseError::MissingElement { tag, name } => {
                write!(f, "command set lacks {name} {}", t(*tag))
            }
        }
    }
}

impl std::error::Error for DimseError {}

const TAG_AFFECTED_SOP_CLASS: u32 = 0x0000_0002;
const TAG_COMMAND_FIELD: u32 = 0x0000_0100;
const TAG_MESSAGE_ID: u32 = 0x0000_0110;
const TAG_MESSAGE_ID_RESPONDED: u32 = 0x0000_0120;
const TAG_PRIORITY: u32 = 0x0000_0700;
const TAG_DATA_SET_TYPE: u32 = 0x0000_0800;
const TAG_STATUS: u32 = 0x0000_0900;
const TAG_ERROR_COMMENT: u32 = 0x0000_0902;
const TAG_AFFECTED_SOP_INSTANCE: u32 = 0x0000_1000;
const TAG_MOVE_ORIGINATOR_AE: u32 = 0x0000_1030;
const TAG_MOVE_ORIGINATOR_ID: u32 = 0x0000_1031;

fn us(tag: u32, value: &[u8]) -> Result<u16, DimseError> {
    match value {
        [a, b] => Ok(u16::from_le_bytes([*a, *b])),
        _ => Err(DimseError::BadValueLength {
            tag,
            length: value.len() as u32,
        }),
    }
}

/// Decodes a text value: lossy UTF-8, trailing NUL/space removed (and leading spaces when
/// `trim_leading`); empty becomes `None`.
fn text(value: &[u8], trim_leading: bool) -> Option<String> {
    let s = crate::sniff::utf8_lossy(value);
    let s = s.trim_end_matches(['\0', ' ']);
    let s = if trim_leading {
        s.trim_start_matches(' ')
    } else {
        s
    };
    (!s.is_empty()).then(|| s.to_owned())
}

/// Parses a complete command set (all command PDV fragments concatenated).
///
/// Every element length is checked against the remaining bytes; elements of tags this
/// module does not use (including (0000,0000) and any other group) are skipped. A missing
/// Command Field (0000,0100) or Command Data Set Type (0000,0800) is an error; a missing
/// Message ID reads as 0 and a missing Priority as MEDIUM. UIDs are trimmed of trailing
/// NUL/space. When an element appears twice, the last one wins.
pub fn parse_command(bytes: &[u8]) -> Result<Command, DimseError> {
    let mut cmd = Command::default();
    let (mut have_field, mut have_type) = (false, false);
    let mut offset = 0usize;
    while offset < bytes.len() {
        let header = bytes
            .get(offset..offset + 8)
            .ok_or(DimseError::Truncated { offset })?;
        let group = u16::from_le_bytes([header[0], header[1]]);
        let element = u16::from_le_bytes([header[2], header[3]]);
        let tag = (u32::from(group) << 16) | u32::from(element);
        let length = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if length == 0xFFFF_FFFF {
            return Err(DimseError::UndefinedLength { tag });
        }
        let start = offset + 8;
        let value = usize::try_from(length)
            .ok()
            .and_then(|len| start.checked_add(len))
            .and_then(|end| bytes.get(start..end))
            .ok_or(DimseError::Truncated { offset })?;
        match tag {
            TAG_COMMAND_FIELD => {
                cmd.command_field = us(tag, value)?;
                have_field = true;
            }
            TAG_DATA_SET_TYPE => {
                cmd.data_set_type = us(tag, value)?;
                have_type = true;
            }
            TAG_MESSAGE_ID => cmd.message_id = us(tag, value)?,
            TAG_MESSAGE_ID_RESPONDED => cmd.message_id_being_responded_to = Some(us(tag, value)?),
            TAG_PRIORITY => cmd.priority = us(tag, value)?,
            TAG_STATUS => cmd.status = Some(us(tag, value)?),
            TAG_MOVE_ORIGINATOR_ID => cmd.move_originator_message_id = Some(us(tag, value)?),
            TAG_AFFECTED_SOP_CLASS => cmd.affected_sop_class_uid = text(value, false),
            TAG_AFFECTED_SOP_INSTANCE => cmd.affected_sop_instance_uid = text(value, false),
            TAG_MOVE_ORIGINATOR_AE => cmd.move_originator_ae = text(value, true),
            _ => {}
        }
        offset = start + value.len();
    }
    if !have_field {
        return Err(DimseError::MissingElement {
            tag: TAG_COMMAND_FIELD,
            name: "Command Field",
        });
    }
    if !have_type {
        return Err(DimseError::MissingElement {
            tag: TAG_DATA_SET_TYPE,
            name: "Command Data Set Type",
        });
    }
    Ok(cmd)
}

/// Builds a command set: elements are added in ascending tag order by the callers, and
/// `finish` prepends (0000,0000) Command Group Length.
struct Encoder {
    body: Vec<u8>,
}

impl Encoder {
    fn new() -> Encoder {
        Encoder {
            body: Vec::with_capacity(160),
        }
    }

    fn raw(&mut self, tag: u32, value: &[u8], pad: Option<u8>) {
        let padded = value.len() + usize::from(pad.is_some() && value.len() % 2 == 1);
        self.body
            .extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
        self.body.extend_from_slice(&(tag as u16).to_le_bytes());
        // Values are UIDs, AE titles and comments cut to 64 characters: far below 4 GiB.
        self.body.extend_from_slice(&(padded as u32).to_le_bytes());
        self.body.extend_from_slice(value);
        if let (Some(p), true) = (pad, padded != value.len()) {
            self.body.push(p);
        }
    }

    fn us(&mut self, tag: u32, value: u16) {
        self.raw(tag, &value.to_le_bytes(), None);
    }

    /// UI, padded with NUL to even length; cut to 64 bytes.
    fn uid(&mut self, tag: u32, uid: &str) {
        let b = uid.as_bytes();
        self.raw(tag, b.get(..64).unwrap_or(b), Some(0));
    }

    /// LO Error Comment: printable ASCII only (others, and the `\` delimiter, become `?`),
    /// at most 64 characters, padded with space to even length.
    fn comment(&mut self, comment: &str) {
        let cleaned: Vec<u8> = comment
            .chars()
            .take(MAX_ERROR_COMMENT)
            .map(|c| match c {
                ' '..='~' if c != '\\' => c as u8,
                _ => b'?',
            })
            .collect();
        self.raw(TAG_ERROR_COMMENT, &cleaned, Some(b' '));
    }

    fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.body.len());
        out.extend_from_slice(&[0, 0, 0, 0, 4, 0, 0, 0]);
        out.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }
}

/// Encodes a C-STORE-RSP command set (PS3.7 section 9.3.1.2): (0000,0000) group length,
/// (0000,0002) Affected SOP Class UID, (0000,0100) = 0x8001, (0000,0120) Message ID Being
/// Responded To, (0000,0800) = 0x0101, (0000,0900) Status, (0000,0902) Error Comment when
/// `Some` (cut to 64 characters, non-printable-ASCII and `\` replaced by `?`, padded with a
/// space to even length), (0000,1000) Affected SOP Instance UID. UIDs are padded with NUL
/// to even length.
pub fn encode_c_store_rsp(
    message_id: u16,
    sop_class_uid: &str,
    sop_instance_uid: &str,
    status: u16,
    error_comment: Option<&str>,
) -> Vec<u8> {
    let mut e = Encoder::new();
    e.uid(TAG_AFFECTED_SOP_CLASS, sop_class_uid);
    e.us(TAG_COMMAND_FIELD, command_field::C_STORE_RSP);
    e.us(TAG_MESSAGE_ID_RESPONDED, message_id);
    e.us(TAG_DATA_SET_TYPE, NO_DATA_SET);
    e.us(TAG_STATUS, status);
    if let Some(c) = error_comment {
        e.comment(c);
    }
    e.uid(TAG_AFFECTED_SOP_INSTANCE, sop_instance_uid);
    e.finish()
}

/// Encodes a C-ECHO-RSP command set (PS3.7 section 9.3.5.2) with Affected SOP Class UID
/// 1.2.840.10008.1.1 (Verification).
pub fn encode_c_echo_rsp(message_id: u16, status: u16) -> Vec<u8> {
    let mut e = Encoder::new();
    e.uid(TAG_AFFECTED_SOP_CLASS, VERIFICATION_SOP_CLASS);
    e.us(TAG_COMMAND_FIELD, command_field::C_ECHO_RSP);
    e.us(TAG_MESSAGE_ID_RESPONDED, message_id);
    e.us(TAG_DATA_SET_TYPE, NO_DATA_SET);
    e.us(TAG_STATUS, status);
    e.finish()
}

/// Encodes the failure response to a request this server does not perform (e.g. a C-FIND
/// sent to a storage SCP, usually with status 0x0211 Unrecognized Operation): command field
/// = the request's | 0x8000, Message ID Being Responded To = its Message ID, no data set,
/// `status`, `error_comment` (as in [`encode_c_store_rsp`]), and the request's Affected SOP
/// Class/Instance UIDs when it had them.
pub fn encode_failure_rsp(request: &Command, status: u16, error_comment: &str) -> Vec<u8> {
    let mut e = Encoder::new();
    if let Some(uid) = &request.affected_sop_class_uid {
        e.uid(TAG_AFFECTED_SOP_CLASS, uid);
    }
    e.us(TAG_COMMAND_FIELD, request.command_field | 0x8000);
    e.us(TAG_MESSAGE_ID_RESPONDED, request.message_id);
    e.us(TAG_DATA_SET_TYPE, NO_DATA_SET);
    e.us(TAG_STATUS, status);
    e.comment(error_comment);
    if let Some(uid) = &request.affected_sop_instance_uid {
        e.uid(TAG_AFFECTED_SOP_INSTANCE, uid);
    }
    e.finish()
}

/// Encodes a C-STORE-RQ command set (PS3.7 section 9.3.1.1) announcing a data set
/// (Command Data Set Type = [`DATA_SET_PRESENT`]); for tests and the load generator.
pub fn encode_c_store_rq(
    message_id: u16,
    sop_class_uid: &str,
    sop_instance_uid: &str,
    priority: u16,
) -> Vec<u8> {
    let mut e = Encoder::new();
    e.uid(TAG_AFFECTED_SOP_CLASS, sop_class_uid);
    e.us(TAG_COMMAND_FIELD, command_field::C_STORE_RQ);
    e.us(TAG_MESSAGE_ID, message_id);
    e.us(TAG_PRIORITY, priority);
    e.us(TAG_DATA_SET_TYPE, DATA_SET_PRESENT);
    e.uid(TAG_AFFECTED_SOP_INSTANCE, sop_instance_uid);
    e.finish()
}

/// Encodes a C-ECHO-RQ command set (PS3.7 section 9.3.5.1), byte-identical to the one
/// dcmtk `echoscu` sends.
pub fn encode_c_echo_rq(message_id: u16) -> Vec<u8> {
    let mut e = Encoder::new();
    e.uid(TAG_AFFECTED_SOP_CLASS, VERIFICATION_SOP_CLASS);
    e.us(TAG_COMMAND_FIELD, command_field::C_ECHO_RQ);
    e.us(TAG_MESSAGE_ID, message_id);
    e.us(TAG_DATA_SET_TYPE, NO_DATA_SET);
    e.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// C-ECHO-RQ, Message ID 1, as dcmtk echoscu (and pynetdicom) send it; offsets are
    /// within the command set (PS3.7 E.1).
    const ECHO_RQ: &[u8] = &[
        // 0: (0000,0000) UL length 4 = 56
        0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x38, 0x00, 0x00, 0x00,
        // 12: (0000,0002) UI length 18 "1.2.840.10008.1.1\0"
        0x00, 0x00, 0x02, 0x00, 0x12, 0x00, 0x00, 0x00, b'1', b'.', b'2', b'.', b'8', b'4', b'0',
        b'.', b'1', b'0', b'0', b'0', b'8', b'.', b'1', b'.', b'1', 0x00,
        // 38: (0000,0100) US 0x0030
        0x00, 0x00, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x30, 0x00,
        // 48: (0000,0110) US 1
        0x00, 0x00, 0x10, 0x01, 0x02, 0x00, 0x00, 0x00, 0x01, 0x00,
        // 58: (0000,0800) US 0x0101
        0x00, 0x00, 0x00, 0x08, 0x02, 0x00, 0x00, 0x00, 0x01, 0x01,
    ];

    /// C-STORE-RQ as pynetdicom sends it from a C-MOVE sub-operation (CT Image Storage,
    /// Message ID 7, priority MEDIUM, data set type 0x0001, Move Originator "MOVESCU"/3).
    fn store_rq() -> Vec<u8> {
        let mut b = vec![
            0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x78, 0x00, 0x00,
            0x00, // (0000,0000)
            0x00, 0x00, 0x02, 0x00, 0x1a, 0x00, 0x00, 0x00, // (0000,0002) UI 26
        ];
        b.extend_from_slice(b"1.2.840.10008.5.1.4.1.1.2\0");
        b.extend_from_slice(&[
            0x00, 0x00, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x01, 0x00, // (0000,0100) 1
            0x00, 0x00, 0x10, 0x01, 0x02, 0x00, 0x00, 0x00, 0x07, 0x00, // (0000,0110) 7
            0x00, 0x00, 0x00, 0x07, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, // (0000,0700) 0
            0x00, 0x00, 0x00, 0x08, 0x02, 0x00, 0x00, 0x00, 0x01, 0x00, // (0000,0800) 1
            0x00, 0x00, 0x00, 0x10, 0x0c, 0x00, 0x00, 0x00, // (0000,1000) UI 12
        ]);
        b.extend_from_slice(b"1.2.3.4.5.6\0");
        b.extend_from_slice(&[0x00, 0x00, 0x30, 0x10, 0x08, 0x00, 0x00, 0x00]);
        b.extend_from_slice(b"MOVESCU ");
        b.extend_from_slice(&[0x00, 0x00, 0x31, 0x10, 0x02, 0x00, 0x00, 0x00, 0x03, 0x00]);
        b
    }

    /// (tag, value) pairs of an encoded command set; checks group length and tag order.
    fn elements(b: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut o = 0;
        while o < b.len() {
            let tag = (u32::from(u16::from_le_bytes([b[o], b[o + 1]])) << 16)
                | u32::from(u16::from_le_bytes([b[o + 2], b[o + 3]]));
            let len = u32::from_le_bytes(b[o + 4..o + 8].try_into().unwrap()) as usize;
            assert_eq!(len % 2, 0);
            out.push((tag, b[o + 8..o + 8 + len].to_vec()));
            o += 8 + len;
        }
        assert_eq!(o, b.len());
        assert_eq!(out[0].0, 0);
        assert_eq!(
            u32::from_le_bytes(out[0].1[..].try_into().unwrap()) as usize,
            b.len() - 12
        );
        assert!(
            out.windows(2).all(|w| w[0].0 < w[1].0),
            "tags not ascending"
        );
        out
    }

    #[test]
    fn parses_echoscu_echo_rq() {
        let c = parse_command(ECHO_RQ).unwrap();
        assert_eq!(
            c,
            Command {
                command_field: command_field::C_ECHO_RQ,
                message_id: 1,
                affected_sop_class_uid: Some(VERIFICATION_SOP_CLASS.into()),
                data_set_type: NO_DATA_SET,
                ..Command::default()
            }
        );
        assert!(!c.has_data_set());
        assert_eq!(encode_c_echo_rq(1), ECHO_RQ);
    }

    #[test]
    fn parses_store_rq() {
        let c = parse_command(&store_rq()).unwrap();
        assert_eq!(
            c,
            Command {
                command_field: command_field::C_STORE_RQ,
                message_id: 7,
                message_id_being_responded_to: None,
                affected_sop_class_uid: Some("1.2.840.10008.5.1.4.1.1.2".into()),
                affected_sop_instance_uid: Some("1.2.3.4.5.6".into()),
                priority: 0,
                data_set_type: 1,
                status: None,
                move_originator_ae: Some("MOVESCU".into()),
                move_originator_message_id: Some(3),
            }
        );
        assert!(c.has_data_set());
    }

    #[test]
    fn store_rq_round_trip() {
        let b = encode_c_store_rq(0xFFFF, "1.2.840.10008.5.1.4.1.1.7", "1.2.3", 2);
        elements(&b);
        let c = parse_command(&b).unwrap();
        assert_eq!(c.command_field, command_field::C_STORE_RQ);
        assert_eq!(c.message_id, 0xFFFF);
        assert_eq!(c.priority, 2);
        assert!(c.has_data_set());
        assert_eq!(
            c.affected_sop_class_uid.as_deref(),
            Some("1.2.840.10008.5.1.4.1.1.7")
        );
        assert_eq!(c.affected_sop_instance_uid.as_deref(), Some("1.2.3"));
        // Without the Move Originator elements, it is the pynetdicom literal shortened.
        let mut rq = store_rq();
        rq.truncate(rq.len() - 26);
        rq[8] = 0x78 - 26;
        assert_eq!(
            encode_c_store_rq(7, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5.6", 0),
            rq
        );
    }

    #[test]
    fn store_rsp_bytes() {
        let b = encode_c_store_rsp(7, "1.2.840.10008.5.1.4.1.1.2", "1.2.3", 0, None);
        let mut e = vec![0u8, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0];
        e.extend_from_slice(&[0, 0, 2, 0, 26, 0, 0, 0]);
        e.extend_from_slice(b"1.2.840.10008.5.1.4.1.1.2\0");
        e.extend_from_slice(&[0, 0, 0x00, 0x01, 2, 0, 0, 0, 0x01, 0x80]);
        e.extend_from_slice(&[0, 0, 0x20, 0x01, 2, 0, 0, 0, 7, 0]);
        e.extend_from_slice(&[0, 0, 0x00, 0x08, 2, 0, 0, 0, 0x01, 0x01]);
        e.extend_from_slice(&[0, 0, 0x00, 0x09, 2, 0, 0, 0, 0, 0]);
        e.extend_from_slice(&[0, 0, 0x00, 0x10, 6, 0, 0, 0]);
        e.extend_from_slice(b"1.2.3\0");
        e[8] = (e.len() - 12) as u8;
        assert_eq!(b, e);
    }

    #[test]
    fn store_rsp_round_trip_with_comment() {
        let b = encode_c_store_rsp(
            3,
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.3.4",
            status::CANNOT_UNDERSTAND,
            Some("missing Study Instance UID"),
        );
        let els = elements(&b);
        let tags: Vec<u32> = els.iter().map(|e| e.0).collect();
        assert_eq!(
            tags,
            [0x0000, 0x0002, 0x0100, 0x0120, 0x0800, 0x0900, 0x0902, 0x1000]
        );
        assert_eq!(els[6].1, b"missing Study Instance UID");
        assert_eq!(els[7].1, b"1.2.3.4\0");
        let c = parse_command(&b).unwrap();
        assert_eq!(c.command_field, command_field::C_STORE_RSP);
        assert_eq!(c.message_id_being_responded_to, Some(3));
        assert_eq!(c.status, Some(0xC000));
        assert_eq!(c.affected_sop_instance_uid.as_deref(), Some("1.2.3.4"));
        assert!(!c.has_data_set());
    }

    #[test]
    fn error_comment_is_cut_padded_and_cleaned() {
        let long = "x".repeat(100);
        let els = elements(&encode_c_store_rsp(1, "1.2", "1.2", 0xA700, Some(&long)));
        assert_eq!(els[6].1, "x".repeat(64).as_bytes());
        let els = elements(&encode_c_store_rsp(1, "1.2", "1.2", 0xA700, Some("odd")));
        assert_eq!(els[6].1, b"odd ");
        let els = elements(&encode_c_store_rsp(
            1,
            "1",
            "1",
            0xA700,
            Some("a\\b\0\u{e9}\n"),
        ));
        assert_eq!(els[6].1, b"a?b???");
        let els = elements(&encode_c_store_rsp(1, "1", "1", 0xA700, Some("")));
        assert_eq!(els[6], (0x0902, vec![]));
    }

    #[test]
    fn echo_rsp() {
        let b = encode_c_echo_rsp(0x1234, status::SUCCESS);
        elements(&b);
        assert_eq!(b.len(), 12 + 26 + 10 + 10 + 10 + 10);
        let c = parse_command(&b).unwrap();
        assert_eq!(
            c,
            Command {
                command_field: command_field::C_ECHO_RSP,
                message_id_being_responded_to: Some(0x1234),
                affected_sop_class_uid: Some(VERIFICATION_SOP_CLASS.into()),
                data_set_type: NO_DATA_SET,
                status: Some(0),
                ..Command::default()
            }
        );
    }

    #[test]
    fn failure_rsp() {
        let rq = Command {
            command_field: command_field::C_FIND_RQ,
            message_id: 9,
            affected_sop_class_uid: Some("1.2.840.10008.5.1.4.1.2.2.1".into()),
            data_set_type: 1,
            ..Command::default()
        };
        let b = encode_failure_rsp(&rq, status::UNRECOGNIZED_OPERATION, "C-FIND not supported");
        let els = elements(&b);
        assert_eq!(els.len(), 7);
        let c = parse_command(&b).unwrap();
        assert_eq!(c.command_field, command_field::C_FIND_RSP);
        assert_eq!(c.message_id_being_responded_to, Some(9));
        assert_eq!(c.status, Some(0x0211));
        assert_eq!(
            c.affected_sop_class_uid.as_deref(),
            Some("1.2.840.10008.5.1.4.1.2.2.1")
        );
        assert_eq!(c.affected_sop_instance_uid, None);
        assert!(!c.has_data_set());
        assert_eq!(els[6].1, b"C-FIND not supported");
        // With an instance UID too (e.g. N-ACTION).
        let rq = Command {
            command_field: command_field::N_ACTION_RQ,
            affected_sop_instance_uid: Some("1.2.3".into()),
            ..rq
        };
        let c = parse_command(&encode_failure_rsp(&rq, 0x0211, "no")).unwrap();
        assert_eq!(c.command_field, command_field::N_ACTION_RSP);
        assert_eq!(c.affected_sop_instance_uid.as_deref(), Some("1.2.3"));
    }

    #[test]
    fn missing_required_elements() {
        // Without (0000,0800).
        let b = &ECHO_RQ[..58];
        assert_eq!(
            parse_command(b),
            Err(DimseError::MissingElement {
                tag: 0x0800,
                name: "Command Data Set Type"
            })
        );
        // Without (0000,0100): drop bytes 38..48.
        let b = [&ECHO_RQ[..38], &ECHO_RQ[48..]].concat();
        assert!(matches!(
            parse_command(&b),
            Err(DimseError::MissingElement { tag: 0x0100, .. })
        ));
        assert!(parse_command(&[]).is_err());
    }

    #[test]
    fn malformed_lengths() {
        // Every strict prefix that is not at an element boundary is truncated.
        let boundaries = [0, 12, 38, 48, 58];
        for n in 1..ECHO_RQ.len() {
            let r = parse_command(&ECHO_RQ[..n]);
            if boundaries.contains(&n) {
                assert!(matches!(r, Err(DimseError::MissingElement { .. })), "{n}");
            } else {
                assert!(matches!(r, Err(DimseError::Truncated { .. })), "{n}: {r:?}");
            }
        }
        // US with a bad length.
        let mut b = ECHO_RQ.to_vec();
        b[42] = 4;
        b.extend_from_slice(&[0, 0]);
        assert_eq!(
            parse_command(&b),
            Err(DimseError::BadValueLength {
                tag: 0x0100,
                length: 4
            })
        );
        // Huge and undefined lengths.
        let mut b = ECHO_RQ.to_vec();
        b[16..20].copy_from_slice(&0xFFFF_FFFEu32.to_le_bytes());
        assert!(matches!(
            parse_command(&b),
            Err(DimseError::Truncated { offset: 12 })
        ));
        b[16..20].copy_from_slice(&0xFFFF_FFFFu32.to_le_bytes());
        assert_eq!(
            parse_command(&b),
            Err(DimseError::UndefinedLength { tag: 2 })
        );
        assert!(!DimseError::UndefinedLength { tag: 2 }
            .to_string()
            .is_empty());
    }

    #[test]
    fn unknown_elements_are_skipped_and_uids_trimmed() {
        let mut b = Vec::new();
        let mut el = |g: u16, e: u16, v: &[u8]| {
            b.extend_from_slice(&g.to_le_bytes());
            b.extend_from_slice(&e.to_le_bytes());
            b.extend_from_slice(&(v.len() as u32).to_le_bytes());
            b.extend_from_slice(v);
        };
        el(0, 0x0002, b"1.2.3 ");
        el(0, 0x0003, b"9.9");
        el(0, 0x0100, &[1, 0]);
        el(0, 0x0600, b"DEST");
        el(0, 0x0800, &[0xFE, 0xFE]);
        el(0, 0x1000, b"\0\0");
        el(0x0008, 0x0016, b"junk");
        let c = parse_command(&b).unwrap();
        assert_eq!(c.affected_sop_class_uid.as_deref(), Some("1.2.3"));
        assert_eq!(c.affected_sop_instance_uid, None);
        assert_eq!(c.data_set_type, 0xFEFE);
        assert!(c.has_data_set());
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u32 = 0x1234_5678;
        for len in 0..300 {
            let mut b = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                // Small lengths now and then so that elements chain.
                b.push(if x & 3 == 0 { 0 } else { (x >> 8) as u8 });
            }
            let _ = parse_command(&b);
        }
        let rq = store_rq();
        for i in 0..rq.len() {
            for v in [0u8, 1, 0x7F, 0xFF] {
                let mut b = rq.clone();
                b[i] = v;
                let _ = parse_command(&b);
            }
        }
    }

    #[test]
    fn command_field_names() {
        assert_eq!(command_field::name(0x0001), Some("C-STORE-RQ"));
        assert_eq!(command_field::name(0x0FFF), Some("C-CANCEL-RQ"));
        assert_eq!(command_field::name(0x1234), None);
        assert!(command_field::is_response(0x8030));
        assert!(!command_field::is_response(0x0030));
    }
}
