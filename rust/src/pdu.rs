//! DICOM Upper Layer PDUs (PS3.8 section 9.3): the byte layout of every PDU this server
//! receives or sends, parsed from and encoded to plain buffers.
//!
//! This module owns the wire format only: the 6-byte PDU header, A-ASSOCIATE-RQ/-AC/-RJ,
//! A-RELEASE-RQ/-RP, A-ABORT and the Presentation Data Value items of P-DATA-TF (with the
//! message control header of PS3.8 Annex E.2), plus the user-information sub-items of PS3.8
//! Annex D and PS3.7 Annex D.3.3. It does no I/O and holds no state: the server reads the
//! header, checks the length against its own limit, reads the body and hands it here; the
//! association module decides what to answer.
//!
//! Parsing is strict where PS3.8 is strict (fixed lengths, mandatory items, protocol version
//! bit 0) and tolerant where real peers differ (padding of AE titles and UIDs, unknown items
//! and sub-items, which PS3.8 9.3.1 says to skip). Every length read from the peer is checked
//! against the bytes actually present before it is used, so no input can make these functions
//! panic, index out of range or allocate more than the input's own size.

use std::fmt;

/// Length of the PDU header: type (1), reserved (1), PDU length (4) (PS3.8 9.3.1).
pub const PDU_HEADER_LEN: usize = 6;

/// The only DICOM Application Context Name (PS3.7 Annex A.2.1).
pub const APPLICATION_CONTEXT_NAME: &str = "1.2.840.10008.3.1.1.1";

/// Length of the fixed fields of an A-ASSOCIATE-RQ/-AC body, before the variable items:
/// protocol version (2), reserved (2), called AE (16), calling AE (16), reserved (32)
/// (PS3.8 9.3.2 and 9.3.3, PDU bytes 7-74).
const ASSOCIATE_FIXED_LEN: usize = 68;

/// Length of an AE title field (PS3.8 9.3.2, bytes 11-26 and 27-42).
const AE_TITLE_LEN: usize = 16;

/// Body length of the A-ASSOCIATE-RJ, A-RELEASE-RQ/-RP and A-ABORT PDUs, fixed by PS3.8.
const SHORT_PDU_BODY_LEN: u32 = 4;

/// Bytes a PDV item adds around its fragment: item length (4), presentation context ID (1),
/// message control header (1) (PS3.8 9.3.5.1 and Annex E.2).
const PDV_OVERHEAD: usize = 6;

/// PDU types (PS3.8 9.3.1, the first byte of every PDU).
pub mod pdu_type {
    /// A-ASSOCIATE-RQ (PS3.8 9.3.2).
    pub const ASSOCIATE_RQ: u8 = 0x01;
    /// A-ASSOCIATE-AC (PS3.8 9.3.3).
    pub const ASSOCIATE_AC: u8 = 0x02;
    /// A-ASSOCIATE-RJ (PS3.8 9.3.4).
    pub const ASSOCIATE_RJ: u8 = 0x03;
    /// P-DATA-TF (PS3.8 9.3.5).
    pub const P_DATA_TF: u8 = 0x04;
    /// A-RELEASE-RQ (PS3.8 9.3.6).
    pub const RELEASE_RQ: u8 = 0x05;
    /// A-RELEASE-RP (PS3.8 9.3.7).
    pub const RELEASE_RP: u8 = 0x06;
    /// A-ABORT (PS3.8 9.3.8).
    pub const A_ABORT: u8 = 0x07;
}

/// Item and sub-item types of the A-ASSOCIATE PDUs (PS3.8 9.3.2, 9.3.3, Annex D;
/// PS3.7 Annex D.3.3).
pub mod item_type {
    /// Application Context Item (PS3.8 9.3.2.1).
    pub const APPLICATION_CONTEXT: u8 = 0x10;
    /// Presentation Context Item of an A-ASSOCIATE-RQ (PS3.8 9.3.2.2).
    pub const PRESENTATION_CONTEXT_RQ: u8 = 0x20;
    /// Presentation Context Item of an A-ASSOCIATE-AC (PS3.8 9.3.3.2).
    pub const PRESENTATION_CONTEXT_AC: u8 = 0x21;
    /// Abstract Syntax Sub-Item (PS3.8 9.3.2.2.1).
    pub const ABSTRACT_SYNTAX: u8 = 0x30;
    /// Transfer Syntax Sub-Item (PS3.8 9.3.2.2.2, 9.3.3.2.1).
    pub const TRANSFER_SYNTAX: u8 = 0x40;
    /// User Information Item (PS3.8 9.3.2.3).
    pub const USER_INFORMATION: u8 = 0x50;
    /// Maximum Length Sub-Item (PS3.8 Annex D.1).
    pub const MAX_LENGTH: u8 = 0x51;
    /// Implementation Class UID Sub-Item (PS3.7 D.3.3.2).
    pub const IMPLEMENTATION_CLASS_UID: u8 = 0x52;
    /// Asynchronous Operations Window Sub-Item (PS3.7 D.3.3.3).
    pub const ASYNC_OPS_WINDOW: u8 = 0x53;
    /// SCP/SCU Role Selection Sub-Item (PS3.7 D.3.3.4).
    pub const ROLE_SELECTION: u8 = 0x54;
    /// Implementation Version Name Sub-Item (PS3.7 D.3.3.2).
    pub const IMPLEMENTATION_VERSION_NAME: u8 = 0x55;
    /// SOP Class Extended Negotiation Sub-Item (PS3.7 D.3.3.5).
    pub const SOP_CLASS_EXTENDED_NEGOTIATION: u8 = 0x56;
    /// SOP Class Common Extended Negotiation Sub-Item (PS3.7 D.3.3.6); skipped when parsed.
    pub const SOP_CLASS_COMMON_EXTENDED_NEGOTIATION: u8 = 0x57;
    /// User Identity Sub-Item of an A-ASSOCIATE-RQ (PS3.7 D.3.3.7).
    pub const USER_IDENTITY_RQ: u8 = 0x58;
    /// User Identity Sub-Item of an A-ASSOCIATE-AC (PS3.7 D.3.3.7); skipped when parsed.
    pub const USER_IDENTITY_AC: u8 = 0x59;
}

/// A-ABORT source / reason values (PS3.8 9.3.8).
pub mod abort {
    /// Source: DICOM UL service-user (initiated abort).
    pub const SOURCE_SERVICE_USER: u8 = 0;
    /// Source: DICOM UL service-provider (initiated abort).
    pub const SOURCE_SERVICE_PROVIDER: u8 = 2;
    /// Reason: reason-not-specified.
    pub const REASON_NOT_SPECIFIED: u8 = 0;
    /// Reason: unrecognized-PDU.
    pub const UNRECOGNIZED_PDU: u8 = 1;
    /// Reason: unexpected-PDU.
    pub const UNEXPECTED_PDU: u8 = 2;
    /// Reason: unrecognized-PDU parameter.
    pub const UNRECOGNIZED_PDU_PARAMETER: u8 = 4;
    /// Reason: unexpected-PDU parameter.
    pub const UNEXPECTED_PDU_PARAMETER: u8 = 5;
    /// Reason: invalid-PDU-parameter value.
    pub const INVALID_PDU_PARAMETER_VALUE: u8 = 6;
}

/// Presentation context Result/Reason values of the A-ASSOCIATE-AC (PS3.8 9.3.3.2).
pub mod presentation_result {
    /// acceptance.
    pub const ACCEPTANCE: u8 = 0;
    /// user-rejection.
    pub const USER_REJECTION: u8 = 1;
    /// no-reason (provider rejection).
    pub const NO_REASON: u8 = 2;
    /// abstract-syntax-not-supported (provider rejection).
    pub const ABSTRACT_SYNTAX_NOT_SUPPORTED: u8 = 3;
    /// transfer-syntaxes-not-supported (provider rejection).
    pub const TRANSFER_SYNTAXES_NOT_SUPPORTED: u8 = 4;
}

/// A-ASSOCIATE-RJ result / source / reason values (PS3.8 9.3.4).
pub mod reject {
    /// Result: rejected-permanent.
    pub const RESULT_PERMANENT: u8 = 1;
    /// Result: rejected-transient.
    pub const RESULT_TRANSIENT: u8 = 2;
    /// Source: DICOM UL service-user.
    pub const SOURCE_SERVICE_USER: u8 = 1;
    /// Source: DICOM UL service-provider (ACSE related function).
    pub const SOURCE_PROVIDER_ACSE: u8 = 2;
    /// Source: DICOM UL service-provider (Presentation related function).
    pub const SOURCE_PROVIDER_PRESENTATION: u8 = 3;
    /// Reason (source 1): no-reason-given.
    pub const USER_NO_REASON: u8 = 1;
    /// Reason (source 1): application-context-name-not-supported.
    pub const USER_APPLICATION_CONTEXT_NOT_SUPPORTED: u8 = 2;
    /// Reason (source 1): calling-AE-title-not-recognized.
    pub const USER_CALLING_AE_NOT_RECOGNIZED: u8 = 3;
    /// Reason (source 1): called-AE-title-not-recognized.
    pub const USER_CALLED_AE_NOT_RECOGNIZED: u8 = 7;
    /// Reason (source 2): protocol-version-not-supported.
    pub const ACSE_PROTOCOL_VERSION_NOT_SUPPORTED: u8 = 2;
    /// Reason (source 3): temporary-congestion.
    pub const PRESENTATION_TEMPORARY_CONGESTION: u8 = 1;
    /// Reason (source 3): local-limit-exceeded.
    pub const PRESENTATION_LOCAL_LIMIT_EXCEEDED: u8 = 2;
}

/// Why a PDU could not be parsed. Each variant names the PS3.8 field at fault so that the
/// log line alone explains the abort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PduError {
    /// The first byte of the PDU header is not one of the seven PDU types of PS3.8 9.3.1.
    UnknownPduType(u8),
    /// A PDU whose length PS3.8 fixes (A-ASSOCIATE-RJ, A-RELEASE-RQ/-RP, A-ABORT: 4) carried
    /// another length.
    BadFixedLength {
        /// The PDU type.
        pdu_type: u8,
        /// The length found in the header or the body size.
        length: u32,
    },
    /// A PDU whose announced length is above the receiver's limit.
    TooLong {
        /// The PDU type.
        pdu_type: u8,
        /// The length announced in the header.
        length: u32,
        /// The limit it exceeds.
        limit: u32,
    },
    /// A field or item runs past the end of its enclosing PDU or item.
    Truncated {
        /// The field or item being read.
        what: &'static str,
        /// Bytes it needs.
        needed: usize,
        /// Bytes that remain.
        available: usize,
    },
    /// An item whose length PS3.8/PS3.7 fixes has another length, or a PDV item is shorter
    /// than its two mandatory bytes.
    BadItemLength {
        /// The item.
        what: &'static str,
        /// The length found.
        length: usize,
    },
    /// The protocol version of an A-ASSOCIATE-RQ/-AC does not have bit 0 set (PS3.8 9.3.2).
    /// The server answers with A-ASSOCIATE-RJ 1/2/2 rather than an abort; see
    /// [`PduError::associate_rj`].
    ProtocolVersion(u16),
    /// A mandatory item or sub-item is absent.
    MissingItem(&'static str),
    /// An item or sub-item that PS3.8 allows once appears again.
    DuplicateItem(&'static str),
}

impl PduError {
    /// The PS3.8 A-ABORT reason to send for this error.
    pub fn abort_reason(&self) -> u8 {
        match self {
            PduError::UnknownPduType(_) => abort::UNRECOGNIZED_PDU,
            PduError::DuplicateItem(_) => abort::UNEXPECTED_PDU_PARAMETER,
            PduError::BadFixedLength { .. }
            | PduError::TooLong { .. }
            | PduError::Truncated { .. }
            | PduError::BadItemLength { .. }
            | PduError::ProtocolVersion(_)
            | PduError::MissingItem(_) => abort::INVALID_PDU_PARAMETER_VALUE,
        }
    }

    /// The A-ASSOCIATE-RJ (result, source, reason) that PS3.8 prescribes instead of an
    /// abort, if any: only an unsupported protocol version is rejected (1/2/2) rather than
    /// aborted.
    pub fn associate_rj(&self) -> Option<(u8, u8, u8)> {
        match self {
            PduError::ProtocolVersion(_) => Some((
                reject::RESULT_PERMANENT,
                reject::SOURCE_PROVIDER_ACSE,
                reject::ACSE_PROTOCOL_VERSION_NOT_SUPPORTED,
            )),
            _ => None,
        }
    }
}

impl fmt::Display for PduError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PduError::UnknownPduType(t) => write!(f, "unrecognized PDU type 0x{t:02X}"),
            PduError::BadFixedLength { pdu_type, length } => write!(
                f,
                "{} PDU has length {length}, PS3.8 fixes it at {SHORT_PDU_BODY_LEN}",
                pdu_type_name(*pdu_type)
            ),
            PduError::TooLong {
                pdu_type,
                length,
                limit,
            } => write!(
                f,
                "{} PDU length {length} exceeds the limit of {limit}",
                pdu_type_name(*pdu_type)
            ),
            PduError::Truncated {
                what,
                needed,
                available,
            } => write!(f, "{what} needs {needed} bytes but only {available} remain"),
            PduError::BadItemLength { what, length } => {
                write!(f, "{what} has invalid length {length}")
            }
            PduError::ProtocolVersion(v) => write!(
                f,
                "protocol version 0x{v:04X} is not supported (bit 0 must be set)"
            ),
            PduError::MissingItem(what) => write!(f, "mandatory {what} is missing"),
            PduError::DuplicateItem(what) => write!(f, "{what} appears more than once"),
        }
    }
}

impl std::error::Error for PduError {}

/// The PS3.8 name of a PDU type, for log lines ("unknown" for anything else).
pub fn pdu_type_name(pdu_type: u8) -> &'static str {
    match pdu_type {
        pdu_type::ASSOCIATE_RQ => "A-ASSOCIATE-RQ",
        pdu_type::ASSOCIATE_AC => "A-ASSOCIATE-AC",
        pdu_type::ASSOCIATE_RJ => "A-ASSOCIATE-RJ",
        pdu_type::P_DATA_TF => "P-DATA-TF",
        pdu_type::RELEASE_RQ => "A-RELEASE-RQ",
        pdu_type::RELEASE_RP => "A-RELEASE-RP",
        pdu_type::A_ABORT => "A-ABORT",
        _ => "unknown",
    }
}

/// Parses the 6-byte PDU header: (pdu type, length). Unknown type -> error (reason
/// UNRECOGNIZED_PDU). The PDUs whose length PS3.8 fixes at 4 (A-ASSOCIATE-RJ,
/// A-RELEASE-RQ/-RP, A-ABORT) are rejected here with any other length, so that the caller
/// never reads a body for them that PS3.8 does not allow.
pub fn parse_pdu_header(header: &[u8; 6]) -> Result<(u8, u32), PduError> {
    // PS3.8 9.3.1: byte 1 PDU-type, byte 2 reserved (not tested), bytes 3-6 PDU-length.
    let [kind, _reserved, l0, l1, l2, l3] = *header;
    let length = u32::from_be_bytes([l0, l1, l2, l3]);
    match kind {
        pdu_type::ASSOCIATE_RQ | pdu_type::ASSOCIATE_AC | pdu_type::P_DATA_TF => Ok((kind, length)),
        pdu_type::ASSOCIATE_RJ
        | pdu_type::RELEASE_RQ
        | pdu_type::RELEASE_RP
        | pdu_type::A_ABORT => {
            if length == SHORT_PDU_BODY_LEN {
                Ok((kind, length))
            } else {
                Err(PduError::BadFixedLength {
                    pdu_type: kind,
                    length,
                })
            }
        }
        other => Err(PduError::UnknownPduType(other)),
    }
}

/// Checks a PDU length from [`parse_pdu_header`] against the receiver's limit before the body
/// is read, so that the buffer is never sized from an untrusted length beyond `limit`.
pub fn check_pdu_length(pdu_type: u8, length: u32, limit: u32) -> Result<(), PduError> {
    if length > limit {
        Err(PduError::TooLong {
            pdu_type,
            length,
            limit,
        })
    } else {
        Ok(())
    }
}

/// One proposed presentation context of an A-ASSOCIATE-RQ (PS3.8 9.3.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentationContextRq {
    /// Presentation context ID (odd, 1-255; not checked here).
    pub id: u8,
    /// Abstract syntax name (SOP class UID).
    pub abstract_syntax: String,
    /// Proposed transfer syntax names, in the peer's order. May be empty if the peer sent
    /// none; the association answers such a context with transfer-syntaxes-not-supported.
    pub transfer_syntaxes: Vec<String>,
}

/// An SCP/SCU Role Selection Sub-Item (PS3.7 D.3.3.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleSelection {
    /// The SOP class the roles apply to.
    pub sop_class_uid: String,
    /// SCU role: proposed (RQ) or accepted (AC).
    pub scu_role: bool,
    /// SCP role: proposed (RQ) or accepted (AC).
    pub scp_role: bool,
}

/// The User Information Item of an A-ASSOCIATE-RQ (PS3.8 9.3.2.3, Annex D; PS3.7 D.3.3).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserInformation {
    /// Maximum length of the P-DATA-TF variable field the peer receives; 0 means unlimited
    /// (PS3.8 D.1). `None` if the sub-item was absent.
    pub max_pdu_length: Option<u32>,
    /// Implementation Class UID of the peer.
    pub implementation_class_uid: Option<String>,
    /// Implementation Version Name of the peer.
    pub implementation_version_name: Option<String>,
    /// (max operations invoked, max operations performed)
    pub async_ops_window: Option<(u16, u16)>,
    /// SCP/SCU role selections, in the peer's order.
    pub role_selections: Vec<RoleSelection>,
    /// SOP class UID, service-class-application-info
    pub extended_negotiations: Vec<(String, Vec<u8>)>,
    /// User identity type, primary field (accepted, ignored)
    pub user_identity: Option<(u8, Vec<u8>)>,
}

/// A parsed A-ASSOCIATE-RQ (PS3.8 9.3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssociateRq {
    /// Protocol version bit field; bit 0 (version 1) is always set once parsed.
    pub protocol_version: u16,
    /// Called AE title, padding trimmed.
    pub called_ae: String,
    /// Calling AE title, padding trimmed.
    pub calling_ae: String,
    /// Application context name (compare with [`APPLICATION_CONTEXT_NAME`]).
    pub application_context: String,
    /// Proposed presentation contexts, in the peer's order (at least one).
    pub presentation_contexts: Vec<PresentationContextRq>,
    /// The User Information Item.
    pub user_info: UserInformation,
}

/// One presentation context result of an A-ASSOCIATE-AC (PS3.8 9.3.3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentationContextAc {
    /// Presentation context ID, as proposed.
    pub id: u8,
    /// One of [`presentation_result`].
    pub result: u8,
    /// Accepted transfer syntax; not significant when `result` is not acceptance.
    pub transfer_syntax: String,
}

/// An A-ASSOCIATE-AC (PS3.8 9.3.3), as sent by this server or parsed by tests and the load
/// generator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssociateAc {
    /// Called AE title, echoed from the RQ.
    pub called_ae: String,
    /// Calling AE title, echoed from the RQ.
    pub calling_ae: String,
    /// Application context name.
    pub application_context: String,
    /// One result per proposed context.
    pub presentation_contexts: Vec<PresentationContextAc>,
    /// Maximum P-DATA-TF variable field length this side receives; 0 means unlimited.
    pub max_pdu_length: u32,
    /// Implementation Class UID of this side.
    pub implementation_class_uid: String,
    /// Implementation Version Name of this side; omitted from the PDU when empty.
    pub implementation_version_name: String,
    /// Negotiated (max operations invoked, max operations performed), if any.
    pub async_ops_window: Option<(u16, u16)>,
    /// Role selection answers.
    pub role_selections: Vec<RoleSelection>,
}

// ---------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------

/// A bounds-checked cursor over untrusted bytes: every read either succeeds inside the
/// slice or returns [`PduError::Truncated`].
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], PduError> {
        let (head, tail) = self.rest.split_at_checked(n).ok_or(PduError::Truncated {
            what,
            needed: n,
            available: self.rest.len(),
        })?;
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], PduError> {
        let (head, tail) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(PduError::Truncated {
                what,
                needed: N,
                available: self.rest.len(),
            })?;
        self.rest = tail;
        Ok(*head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, PduError> {
        let [b] = self.array::<1>(what)?;
        Ok(b)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, PduError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    /// Reads an item or sub-item: type (1), reserved (1, not tested), length (2), value
    /// (PS3.8 9.3.2.x and Annex D: all share this header).
    fn item(&mut self, what: &'static str) -> Result<(u8, &'a [u8]), PduError> {
        let [kind, _reserved, l0, l1] = self.array::<4>(what)?;
        let value = self.take(usize::from(u16::from_be_bytes([l0, l1])), what)?;
        Ok((kind, value))
    }
}

/// The value of a sub-item whose length PS3.7/PS3.8 fixes at N bytes.
fn exact<const N: usize>(value: &[u8], what: &'static str) -> Result<[u8; N], PduError> {
    <[u8; N]>::try_from(value).map_err(|_| PduError::BadItemLength {
        what,
        length: value.len(),
    })
}

/// Stores an item that may appear only once.
fn set_once<T>(slot: &mut Option<T>, value: T, what: &'static str) -> Result<(), PduError> {
    if slot.is_some() {
        return Err(PduError::DuplicateItem(what));
    }
    *slot = Some(value);
    Ok(())
}

/// AE titles are space padded; some peers pad with NULs or send leading spaces, which
/// PS3.5 makes insignificant.
fn ae_title(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_matches([' ', '\0'])
        .to_owned()
}

/// UIDs must not be padded in the Upper Layer (PS3.8 Annex F), but some peers add the
/// DICOM-file-style trailing NUL (or a space); drop it so comparisons work.
fn uid(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_end_matches([' ', '\0'])
        .to_owned()
}

/// The fixed part shared by A-ASSOCIATE-RQ and -AC (PS3.8 9.3.2 / 9.3.3, PDU bytes 7-74),
/// returning the protocol version, both AE titles and a reader on the variable items.
fn parse_associate_fixed(body: &[u8]) -> Result<(u16, String, String, Reader<'_>), PduError> {
    let mut r = Reader::new(body);
    // PDU bytes 7-8: protocol version. Checked first so that a peer speaking a future
    // version, whose layout may differ, is rejected (RJ 1/2/2) rather than aborted.
    let version = r.u16("protocol version")?;
    if version & 1 == 0 {
        return Err(PduError::ProtocolVersion(version));
    }
    // Bytes 9-10 reserved; 11-26 called AE; 27-42 calling AE; 43-74 reserved.
    r.take(2, "A-ASSOCIATE fixed fields")?;
    let called = ae_title(r.take(AE_TITLE_LEN, "called AE title")?);
    let calling = ae_title(r.take(AE_TITLE_LEN, "calling AE title")?);
    r.take(32, "A-ASSOCIATE fixed fields")?;
    Ok((version, called, calling, r))
}

/// Parses an A-ASSOCIATE-RQ body (the bytes after the 6-byte PDU header).
pub fn parse_associate_rq(body: &[u8]) -> Result<AssociateRq, PduError> {
    let (protocol_version, called_ae, calling_ae, mut items) = parse_associate_fixed(body)?;
    let mut application_context = None;
    let mut presentation_contexts = Vec::new();
    let mut user_info = None;
    // PDU bytes 75-xxx: one Application Context Item, one or more Presentation Context
    // Items and one User Information Item (PS3.8 9.3.2).
    while !items.is_empty() {
        let (kind, value) = items.item("A-ASSOCIATE-RQ variable item")?;
        match kind {
            item_type::APPLICATION_CONTEXT => set_once(
                &mut application_context,
                uid(value),
                "Application Context Item",
            )?,
            item_type::PRESENTATION_CONTEXT_RQ => {
                presentation_contexts.push(parse_presentation_context_rq(value)?);
            }
            item_type::USER_INFORMATION => set_once(
                &mut user_info,
                parse_user_information(value)?,
                "User Information Item",
            )?,
            // PS3.8 9.3.1: items of unrecognized types are ignored and skipped.
            _ => {}
        }
    }
    let application_context =
        application_context.ok_or(PduError::MissingItem("Application Context Item"))?;
    if presentation_contexts.is_empty() {
        return Err(PduError::MissingItem("Presentation Context Item"));
    }
    let user_info = user_info.ok_or(PduError::MissingItem("User Information Item"))?;
    Ok(AssociateRq {
        protocol_version,
        called_ae,
        calling_ae,
        application_context,
        presentation_contexts,
        user_info,
    })
}

/// Presentation Context Item (RQ) value (PS3.8 9.3.2.2): ID (1), reserved (3), one Abstract
/// Syntax Sub-Item, one or more Transfer Syntax Sub-Items.
fn parse_presentation_context_rq(value: &[u8]) -> Result<PresentationContextRq, PduError> {
    let mut r = Reader::new(value);
    let id = r.u8("Presentation Context Item (RQ)")?;
    r.take(3, "Presentation Context Item (RQ)")?;
    let mut abstract_syntax = None;
    let mut transfer_syntaxes = Vec::new();
    while !r.is_empty() {
        let (kind, sub) = r.item("Presentation Context sub-item")?;
        match kind {
            item_type::ABSTRACT_SYNTAX => {
                set_once(&mut abstract_syntax, uid(sub), "Abstract Syntax Sub-Item")?;
            }
            item_type::TRANSFER_SYNTAX => transfer_syntaxes.push(uid(sub)),
            _ => {}
        }
    }
    let abstract_syntax =
        abstract_syntax.ok_or(PduError::MissingItem("Abstract Syntax Sub-Item"))?;
    Ok(PresentationContextRq {
        id,
        abstract_syntax,
        transfer_syntaxes,
    })
}

/// Presentation Context Item (AC) value (PS3.8 9.3.3.2): ID (1), reserved (1),
/// result/reason (1), reserved (1), one Transfer Syntax Sub-Item.
fn parse_presentation_context_ac(value: &[u8]) -> Result<PresentationContextAc, PduError> {
    let mut r = Reader::new(value);
    let [id, _reserved, result, _reserved2] = r.array::<4>("Presentation Context Item (AC)")?;
    let mut transfer_syntax = None;
    while !r.is_empty() {
        let (kind, sub) = r.item("Presentation Context sub-item")?;
        if kind == item_type::TRANSFER_SYNTAX {
            set_once(&mut transfer_syntax, uid(sub), "Transfer Syntax Sub-Item")?;
        }
    }
    Ok(PresentationContextAc {
        id,
        result,
        // The sub-item is not significant for a rejected context (PS3.8 9.3.3.2), and some
        // peers omit it there; an empty name says "none".
        transfer_syntax: transfer_syntax.unwrap_or_default(),
    })
}

/// User Information Item value: a sequence of sub-items (PS3.8 Annex D, PS3.7 D.3.3).
fn parse_user_information(value: &[u8]) -> Result<UserInformation, PduError> {
    let mut r = Reader::new(value);
    let mut ui = UserInformation::default();
    while !r.is_empty() {
        let (kind, sub) = r.item("User Information sub-item")?;
        match kind {
            item_type::MAX_LENGTH => {
                const WHAT: &str = "Maximum Length Sub-Item";
                let len = u32::from_be_bytes(exact(sub, WHAT)?);
                set_once(&mut ui.max_pdu_length, len, WHAT)?;
            }
            item_type::IMPLEMENTATION_CLASS_UID => set_once(
                &mut ui.implementation_class_uid,
                uid(sub),
                "Implementation Class UID Sub-Item",
            )?,
            item_type::ASYNC_OPS_WINDOW => {
                const WHAT: &str = "Asynchronous Operations Window Sub-Item";
                let [a, b, c, d] = exact::<4>(sub, WHAT)?;
                let window = (u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]));
                set_once(&mut ui.async_ops_window, window, WHAT)?;
            }
            item_type::ROLE_SELECTION => ui.role_selections.push(parse_role_selection(sub)?),
            item_type::IMPLEMENTATION_VERSION_NAME => set_once(
                &mut ui.implementation_version_name,
                uid(sub),
                "Implementation Version Name Sub-Item",
            )?,
            item_type::SOP_CLASS_EXTENDED_NEGOTIATION => {
                ui.extended_negotiations
                    .push(parse_extended_negotiation(sub)?);
            }
            item_type::USER_IDENTITY_RQ => set_once(
                &mut ui.user_identity,
                parse_user_identity(sub)?,
                "User Identity Sub-Item",
            )?,
            // Common extended negotiation (0x57), identity response (0x59) and any future
            // sub-item: PS3.8 9.3.1 says skip what is not recognized.
            _ => {}
        }
    }
    Ok(ui)
}

/// SCP/SCU Role Selection Sub-Item value (PS3.7 D.3.3.4): UID length (2), SOP class UID,
/// SCU role (1), SCP role (1).
fn parse_role_selection(value: &[u8]) -> Result<RoleSelection, PduError> {
    const WHAT: &str = "SCP/SCU Role Selection Sub-Item";
    let mut r = Reader::new(value);
    let uid_len = r.u16(WHAT)?;
    let sop_class_uid = uid(r.take(usize::from(uid_len), WHAT)?);
    let [scu, scp] = r.array::<2>(WHAT)?;
    if !r.is_empty() {
        return Err(PduError::BadItemLength {
            what: WHAT,
            length: value.len(),
        });
    }
    Ok(RoleSelection {
        sop_class_uid,
        // PS3.7 defines only 0 and 1; anything non-zero is read as support.
        scu_role: scu != 0,
        scp_role: scp != 0,
    })
}

/// SOP Class Extended Negotiation Sub-Item value (PS3.7 D.3.3.5): UID length (2), SOP class
/// UID, service-class-application-information (the rest).
fn parse_extended_negotiation(value: &[u8]) -> Result<(String, Vec<u8>), PduError> {
    const WHAT: &str = "SOP Class Extended Negotiation Sub-Item";
    let mut r = Reader::new(value);
    let uid_len = r.u16(WHAT)?;
    let sop_class_uid = uid(r.take(usize::from(uid_len), WHAT)?);
    Ok((sop_class_uid, r.rest.to_vec()))
}

/// User Identity Sub-Item (RQ) value (PS3.7 D.3.3.7.1): type (1), positive response
/// requested (1), primary field length (2), primary field, secondary field length (2),
/// secondary field.
fn parse_user_identity(value: &[u8]) -> Result<(u8, Vec<u8>), PduError> {
    const WHAT: &str = "User Identity Sub-Item";
    let mut r = Reader::new(value);
    let [identity_type, _positive_response] = r.array::<2>(WHAT)?;
    let primary_len = r.u16(WHAT)?;
    let primary = r.take(usize::from(primary_len), WHAT)?.to_vec();
    // The secondary field (a passcode for type 2) is not kept, but its length must still
    // frame correctly when present; some peers omit it for types without one.
    if !r.is_empty() {
        let secondary_len = r.u16(WHAT)?;
        r.take(usize::from(secondary_len), WHAT)?;
    }
    Ok((identity_type, primary))
}

/// Parses an A-ASSOCIATE-AC body (the bytes after the 6-byte PDU header). Absent
/// user-information sub-items become 0 / empty strings.
pub fn parse_associate_ac(body: &[u8]) -> Result<AssociateAc, PduError> {
    let (_version, called_ae, calling_ae, mut items) = parse_associate_fixed(body)?;
    let mut application_context = None;
    let mut presentation_contexts = Vec::new();
    let mut user_info = None;
    while !items.is_empty() {
        let (kind, value) = items.item("A-ASSOCIATE-AC variable item")?;
        match kind {
            item_type::APPLICATION_CONTEXT => set_once(
                &mut application_context,
                uid(value),
                "Application Context Item",
            )?,
            item_type::PRESENTATION_CONTEXT_AC => {
                presentation_contexts.push(parse_presentation_context_ac(value)?);
            }
            item_type::USER_INFORMATION => set_once(
                &mut user_info,
                parse_user_information(value)?,
                "User Information Item",
            )?,
            _ => {}
        }
    }
    let application_context =
        application_context.ok_or(PduError::MissingItem("Application Context Item"))?;
    let ui = user_info.ok_or(PduError::MissingItem("User Information Item"))?;
    Ok(AssociateAc {
        called_ae,
        calling_ae,
        application_context,
        presentation_contexts,
        max_pdu_length: ui.max_pdu_length.unwrap_or(0),
        implementation_class_uid: ui.implementation_class_uid.unwrap_or_default(),
        implementation_version_name: ui.implementation_version_name.unwrap_or_default(),
        async_ops_window: ui.async_ops_window,
        role_selections: ui.role_selections,
    })
}

/// (result, source, reason) of an A-ASSOCIATE-RJ body (4 bytes, PS3.8 9.3.4).
pub fn parse_associate_rj(body: &[u8]) -> Result<(u8, u8, u8), PduError> {
    let [_reserved, result, source, reason] = short_body(body, pdu_type::ASSOCIATE_RJ)?;
    Ok((result, source, reason))
}

/// (source, reason) of an A-ABORT body (4 bytes).
pub fn parse_abort(body: &[u8]) -> Result<(u8, u8), PduError> {
    // PS3.8 9.3.8: bytes 7-8 reserved, byte 9 source, byte 10 reason/diag.
    let [_r0, _r1, source, reason] = short_body(body, pdu_type::A_ABORT)?;
    Ok((source, reason))
}

fn short_body(body: &[u8], pdu_type: u8) -> Result<[u8; 4], PduError> {
    <[u8; 4]>::try_from(body).map_err(|_| PduError::BadFixedLength {
        pdu_type,
        length: u32::try_from(body.len()).unwrap_or(u32::MAX),
    })
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

/// Appends a PDU header. Lengths above `u32::MAX` cannot occur for the PDUs built here (the
/// body of an A-ASSOCIATE PDU is bounded by its 16-bit items; P-DATA callers fragment).
fn put_header(out: &mut Vec<u8>, pdu_type: u8, body_len: usize) {
    out.push(pdu_type);
    out.push(0);
    out.extend_from_slice(&u32::try_from(body_len).unwrap_or(u32::MAX).to_be_bytes());
}

/// Appends an item or sub-item with a 16-bit length (PS3.8 9.3.2.x). A value longer than
/// 65535 bytes cannot be framed, so it is cut there rather than producing a length that
/// disagrees with the bytes; no legitimate UID or name comes near it.
fn put_item(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    let value = value.get(..usize::from(u16::MAX)).unwrap_or(value);
    out.push(kind);
    out.push(0);
    out.extend_from_slice(&u16::try_from(value.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(value);
}

/// A 16-bit length-prefixed UID, as inside role selection and extended negotiation.
fn put_prefixed_uid(out: &mut Vec<u8>, uid: &str) {
    let bytes = uid.as_bytes();
    let bytes = bytes.get(..usize::from(u16::MAX)).unwrap_or(bytes);
    out.extend_from_slice(&u16::try_from(bytes.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// An AE title field: 16 bytes, space padded, cut at 16 (PS3.8 9.3.2).
fn put_ae(out: &mut Vec<u8>, ae: &str) {
    let bytes = ae.as_bytes();
    let bytes = bytes.get(..AE_TITLE_LEN).unwrap_or(bytes);
    out.extend_from_slice(bytes);
    out.extend(std::iter::repeat_n(
        b' ',
        AE_TITLE_LEN.saturating_sub(bytes.len()),
    ));
}

/// The fixed fields of an A-ASSOCIATE-RQ/-AC body (PDU bytes 7-74).
fn put_associate_fixed(out: &mut Vec<u8>, protocol_version: u16, called: &str, calling: &str) {
    out.extend_from_slice(&protocol_version.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    put_ae(out, called);
    put_ae(out, calling);
    out.extend_from_slice(&[0; 32]);
}

fn put_role_selection(out: &mut Vec<u8>, role: &RoleSelection) {
    let mut sub = Vec::new();
    put_prefixed_uid(&mut sub, &role.sop_class_uid);
    sub.push(u8::from(role.scu_role));
    sub.push(u8::from(role.scp_role));
    put_item(out, item_type::ROLE_SELECTION, &sub);
}

fn put_async_window(out: &mut Vec<u8>, (invoked, performed): (u16, u16)) {
    let mut sub = [0u8; 4];
    let (a, b) = sub.split_at_mut(2);
    a.copy_from_slice(&invoked.to_be_bytes());
    b.copy_from_slice(&performed.to_be_bytes());
    put_item(out, item_type::ASYNC_OPS_WINDOW, &sub);
}

fn finish_pdu(pdu_type: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PDU_HEADER_LEN.saturating_add(body.len()));
    put_header(&mut out, pdu_type, body.len());
    out.extend_from_slice(body);
    out
}

/// Whole A-ASSOCIATE-AC PDU including header. AE titles space-padded to 16. For a rejected
/// context the transfer syntax sub-item is still present (use the empty string or the first
/// proposed one, as PS3.8 permits: the value is not significant).
pub fn encode_associate_ac(ac: &AssociateAc) -> Vec<u8> {
    let mut body = Vec::with_capacity(ASSOCIATE_FIXED_LEN + 256);
    // PS3.8 9.3.3: protocol version 1; the AE fields echo the RQ and are not tested.
    put_associate_fixed(&mut body, 1, &ac.called_ae, &ac.calling_ae);
    put_item(
        &mut body,
        item_type::APPLICATION_CONTEXT,
        ac.application_context.as_bytes(),
    );
    for pc in &ac.presentation_contexts {
        // ID (1), reserved (1), result/reason (1), reserved (1), Transfer Syntax Sub-Item.
        let mut value = vec![pc.id, 0, pc.result, 0];
        put_item(
            &mut value,
            item_type::TRANSFER_SYNTAX,
            pc.transfer_syntax.as_bytes(),
        );
        put_item(&mut body, item_type::PRESENTATION_CONTEXT_AC, &value);
    }
    let mut ui = Vec::new();
    put_item(
        &mut ui,
        item_type::MAX_LENGTH,
        &ac.max_pdu_length.to_be_bytes(),
    );
    put_item(
        &mut ui,
        item_type::IMPLEMENTATION_CLASS_UID,
        ac.implementation_class_uid.as_bytes(),
    );
    if let Some(window) = ac.async_ops_window {
        put_async_window(&mut ui, window);
    }
    for role in &ac.role_selections {
        put_role_selection(&mut ui, role);
    }
    // PS3.7 D.3.3.2: the version name is optional but, when present, 1-16 characters.
    if !ac.implementation_version_name.is_empty() {
        put_item(
            &mut ui,
            item_type::IMPLEMENTATION_VERSION_NAME,
            ac.implementation_version_name.as_bytes(),
        );
    }
    put_item(&mut body, item_type::USER_INFORMATION, &ui);
    finish_pdu(pdu_type::ASSOCIATE_AC, &body)
}

/// Whole A-ASSOCIATE-RQ PDU including header (tests, load generator). Sub-items are written
/// in increasing type order as PS3.8 9.3.1 asks; absent optional ones are omitted.
pub fn encode_associate_rq(rq: &AssociateRq) -> Vec<u8> {
    let mut body = Vec::with_capacity(ASSOCIATE_FIXED_LEN + 512);
    put_associate_fixed(
        &mut body,
        rq.protocol_version,
        &rq.called_ae,
        &rq.calling_ae,
    );
    put_item(
        &mut body,
        item_type::APPLICATION_CONTEXT,
        rq.application_context.as_bytes(),
    );
    for pc in &rq.presentation_contexts {
        let mut value = vec![pc.id, 0, 0, 0];
        put_item(
            &mut value,
            item_type::ABSTRACT_SYNTAX,
            pc.abstract_syntax.as_bytes(),
        );
        for ts in &pc.transfer_syntaxes {
            put_item(&mut value, item_type::TRANSFER_SYNTAX, ts.as_bytes());
        }
        put_item(&mut body, item_type::PRESENTATION_CONTEXT_RQ, &value);
    }
    let info = &rq.user_info;
    let mut ui = Vec::new();
    if let Some(max) = info.max_pdu_length {
        put_item(&mut ui, item_type::MAX_LENGTH, &max.to_be_bytes());
    }
    if let Some(class_uid) = &info.implementation_class_uid {
        put_item(
            &mut ui,
            item_type::IMPLEMENTATION_CLASS_UID,
            class_uid.as_bytes(),
        );
    }
    if let Some(window) = info.async_ops_window {
        put_async_window(&mut ui, window);
    }
    for role in &info.role_selections {
        put_role_selection(&mut ui, role);
    }
    if let Some(name) = &info.implementation_version_name {
        put_item(
            &mut ui,
            item_type::IMPLEMENTATION_VERSION_NAME,
            name.as_bytes(),
        );
    }
    for (sop_class_uid, app_info) in &info.extended_negotiations {
        let mut sub = Vec::new();
        put_prefixed_uid(&mut sub, sop_class_uid);
        sub.extend_from_slice(app_info);
        put_item(&mut ui, item_type::SOP_CLASS_EXTENDED_NEGOTIATION, &sub);
    }
    if let Some((identity_type, primary)) = &info.user_identity {
        // Type, positive-response-requested = 0, primary field, empty secondary field.
        let primary = primary.get(..usize::from(u16::MAX)).unwrap_or(primary);
        let mut sub = vec![*identity_type, 0];
        sub.extend_from_slice(
            &u16::try_from(primary.len())
                .unwrap_or(u16::MAX)
                .to_be_bytes(),
        );
        sub.extend_from_slice(primary);
        sub.extend_from_slice(&[0, 0]);
        put_item(&mut ui, item_type::USER_IDENTITY_RQ, &sub);
    }
    put_item(&mut body, item_type::USER_INFORMATION, &ui);
    finish_pdu(pdu_type::ASSOCIATE_RQ, &body)
}

/// The four body bytes of the short fixed-length PDUs, with their header.
fn short_pdu(pdu_type: u8, body: [u8; 4]) -> [u8; 10] {
    let [a, b, c, d] = body;
    [pdu_type, 0, 0, 0, 0, 4, a, b, c, d]
}

/// Whole A-ASSOCIATE-RJ PDU (10 bytes).
pub fn encode_associate_rj(result: u8, source: u8, reason: u8) -> [u8; 10] {
    // PS3.8 9.3.4: byte 7 reserved, 8 result, 9 source, 10 reason/diag.
    short_pdu(pdu_type::ASSOCIATE_RJ, [0, result, source, reason])
}

/// Whole A-RELEASE-RQ PDU (10 bytes, PS3.8 9.3.6: 4 reserved body bytes).
pub fn encode_release_rq() -> [u8; 10] {
    short_pdu(pdu_type::RELEASE_RQ, [0; 4])
}

/// Whole A-RELEASE-RP PDU (10 bytes, PS3.8 9.3.7: 4 reserved body bytes).
pub fn encode_release_rp() -> [u8; 10] {
    short_pdu(pdu_type::RELEASE_RP, [0; 4])
}

/// Whole A-ABORT PDU (10 bytes, PS3.8 9.3.8). `reason` is only significant when `source` is
/// [`abort::SOURCE_SERVICE_PROVIDER`]; send [`abort::REASON_NOT_SPECIFIED`] otherwise.
pub fn encode_abort(source: u8, reason: u8) -> [u8; 10] {
    short_pdu(pdu_type::A_ABORT, [0, 0, source, reason])
}

// ---------------------------------------------------------------------------------------
// P-DATA-TF
// ---------------------------------------------------------------------------------------

/// One Presentation Data Value item of a P-DATA-TF PDU (PS3.8 9.3.5.1, E.2 message control
/// header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pdv<'a> {
    /// Presentation context ID the fragment belongs to.
    pub context_id: u8,
    /// Message control header bit 0: command (true) or data set (false) fragment.
    pub is_command: bool,
    /// Message control header bit 1: last fragment of the command or data set.
    pub is_last: bool,
    /// The fragment, borrowed from the PDU body.
    pub data: &'a [u8],
}

/// Iterator over the PDV items of a P-DATA-TF body; see [`pdvs`].
#[derive(Debug, Clone)]
pub struct PdvIter<'a> {
    rest: &'a [u8],
    failed: bool,
}

/// Iterates the PDV items of a P-DATA-TF body; an item whose length overruns the body, or is
/// < 2, yields an error (and the iteration ends).
pub fn pdvs(body: &[u8]) -> PdvIter<'_> {
    PdvIter {
        rest: body,
        failed: false,
    }
}

impl<'a> PdvIter<'a> {
    fn next_pdv(&mut self) -> Result<Pdv<'a>, PduError> {
        const WHAT: &str = "Presentation Data Value Item";
        // PS3.8 9.3.5.1: item length (4), presentation context ID (1), PDV (the message
        // control header of E.2, then the fragment). The length covers ID + PDV.
        let (len, tail) = self
            .rest
            .split_first_chunk::<4>()
            .ok_or(PduError::Truncated {
                what: WHAT,
                needed: 4,
                available: self.rest.len(),
            })?;
        let len = u32::from_be_bytes(*len);
        let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
        if len_usize < 2 {
            return Err(PduError::BadItemLength {
                what: WHAT,
                length: len_usize,
            });
        }
        let (item, after) = tail
            .split_at_checked(len_usize)
            .ok_or(PduError::Truncated {
                what: WHAT,
                needed: len_usize,
                available: tail.len(),
            })?;
        let ([context_id, control], data) =
            item.split_first_chunk::<2>()
                .ok_or(PduError::BadItemLength {
                    what: WHAT,
                    length: item.len(),
                })?;
        self.rest = after;
        // E.2: bit 0 command/data set, bit 1 last/not last; bits 2-7 are not tested.
        Ok(Pdv {
            context_id: *context_id,
            is_command: control & 0x01 != 0,
            is_last: control & 0x02 != 0,
            data,
        })
    }
}

impl<'a> Iterator for PdvIter<'a> {
    type Item = Result<Pdv<'a>, PduError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let item = self.next_pdv();
        // After a framing error the rest of the body has no trustworthy boundaries.
        self.failed = item.is_err();
        Some(item)
    }
}

impl std::iter::FusedIterator for PdvIter<'_> {}

/// Appends to `out` a whole P-DATA-TF PDU holding one PDV. `data` must be shorter than
/// 4 GiB - 6 bytes; split larger messages with [`encode_message_fragments`].
pub fn encode_p_data(
    out: &mut Vec<u8>,
    context_id: u8,
    is_command: bool,
    is_last: bool,
    data: &[u8],
) {
    out.reserve((PDU_HEADER_LEN + PDV_OVERHEAD).saturating_add(data.len()));
    put_header(
        out,
        pdu_type::P_DATA_TF,
        PDV_OVERHEAD.saturating_add(data.len()),
    );
    let item_len = data.len().saturating_add(2);
    out.extend_from_slice(&u32::try_from(item_len).unwrap_or(u32::MAX).to_be_bytes());
    out.push(context_id);
    out.push(u8::from(is_command) | (u8::from(is_last) << 1));
    out.extend_from_slice(data);
}

/// Appends to `out` the P-DATA-TF PDUs that carry `message` as fragments so that no PDU
/// exceeds `max_pdu_length` (the peer's maximum length of the P-DATA-TF PDU *body*, PS3.8
/// D.1; 0 means unlimited), last flag on the final fragment.
///
/// An empty message is sent as one empty last fragment. A limit of 6 or less leaves no room
/// for data; fragments of one byte are sent then, the closest a sender can come.
pub fn encode_message_fragments(
    out: &mut Vec<u8>,
    context_id: u8,
    is_command: bool,
    message: &[u8],
    max_pdu_length: u32,
) {
    let limit = if max_pdu_length == 0 {
        u32::MAX
    } else {
        max_pdu_length
    };
    // The limit counts the whole variable field, so each fragment gives up the PDV item's
    // own six bytes.
    let per_fragment = usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .saturating_sub(PDV_OVERHEAD)
        .max(1);
    if message.is_empty() {
        encode_p_data(out, context_id, is_command, true, &[]);
        return;
    }
    let count = message.len().div_ceil(per_fragment);
    out.reserve(
        message
            .len()
            .saturating_add(count.saturating_mul(PDU_HEADER_LEN + PDV_OVERHEAD)),
    );
    let mut chunks = message.chunks(per_fragment).peekable();
    while let Some(chunk) = chunks.next() {
        let is_last = chunks.peek().is_none();
        encode_p_data(out, context_id, is_command, is_last, chunk);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// An A-ASSOCIATE-RQ as dcmtk 3.6.8 `echoscu` sends it by default (Verification with
    /// Implicit VR Little Endian only, max PDU 16384), written out byte by byte.
    fn echoscu_rq() -> Vec<u8> {
        [
            // PS3.8 9.3.2 bytes 1-6: PDU-type 01, reserved, PDU-length 205 = 68 + 25 + 50 + 62.
            &[0x01, 0x00, 0x00, 0x00, 0x00, 0xCD][..],
            // Bytes 7-8 protocol version 1, bytes 9-10 reserved.
            &[0x00, 0x01, 0x00, 0x00],
            // Bytes 11-26 called AE title, 27-42 calling AE title, space padded to 16.
            b"ANY-SCP         ",
            b"ECHOSCU         ",
            // Bytes 43-74 reserved.
            &[0u8; 32],
            // Byte 75: Application Context Item (9.3.2.1): type 10, reserved, length 21.
            &[0x10, 0x00, 0x00, 0x15],
            b"1.2.840.10008.3.1.1.1",
            // Presentation Context Item (9.3.2.2): type 20, length 46; ID 1, 3 reserved.
            &[0x20, 0x00, 0x00, 0x2E, 0x01, 0x00, 0x00, 0x00],
            // Abstract Syntax Sub-Item (9.3.2.2.1): type 30, length 17, Verification.
            &[0x30, 0x00, 0x00, 0x11],
            b"1.2.840.10008.1.1",
            // Transfer Syntax Sub-Item (9.3.2.2.2): type 40, length 17, Implicit VR LE.
            &[0x40, 0x00, 0x00, 0x11],
            b"1.2.840.10008.1.2",
            // User Information Item (9.3.2.3): type 50, length 58 = 8 + 31 + 19.
            &[0x50, 0x00, 0x00, 0x3A],
            // Maximum Length Sub-Item (D.1): type 51, length 4, 16384.
            &[0x51, 0x00, 0x00, 0x04, 0x00, 0x00, 0x40, 0x00],
            // Implementation Class UID Sub-Item (PS3.7 D.3.3.2): type 52, length 27.
            &[0x52, 0x00, 0x00, 0x1B],
            b"1.2.276.0.7230010.3.0.3.6.8",
            // Implementation Version Name Sub-Item: type 55, length 15.
            &[0x55, 0x00, 0x00, 0x0F],
            b"OFFIS_DCMTK_368",
        ]
        .concat()
    }

    /// Splits a whole PDU into its parsed header and body.
    fn split_pdu(pdu: &[u8]) -> (u8, u32, &[u8]) {
        let (header, body) = pdu.split_first_chunk::<6>().unwrap();
        let (kind, len) = parse_pdu_header(header).unwrap();
        assert_eq!(
            len as usize,
            body.len(),
            "PDU length must equal the body size"
        );
        (kind, len, body)
    }

    fn full_rq() -> AssociateRq {
        AssociateRq {
            protocol_version: 1,
            called_ae: "STORESCP".into(),
            calling_ae: "MODALITY".into(),
            application_context: APPLICATION_CONTEXT_NAME.into(),
            presentation_contexts: vec![
                PresentationContextRq {
                    id: 1,
                    abstract_syntax: "1.2.840.10008.1.1".into(),
                    transfer_syntaxes: vec!["1.2.840.10008.1.2".into()],
                },
                PresentationContextRq {
                    id: 3,
                    abstract_syntax: "1.2.840.10008.5.1.4.1.1.2".into(),
                    transfer_syntaxes: vec![
                        "1.2.840.10008.1.2.1".into(),
                        "1.2.840.10008.1.2".into(),
                        "1.2.840.10008.1.2.4.50".into(),
                    ],
                },
            ],
            user_info: UserInformation {
                max_pdu_length: Some(65536),
                implementation_class_uid: Some("1.2.3.4.5".into()),
                implementation_version_name: Some("LOADGEN_1".into()),
                async_ops_window: Some((5, 1)),
                role_selections: vec![RoleSelection {
                    sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
                    scu_role: true,
                    scp_role: false,
                }],
                extended_negotiations: vec![("1.2.840.10008.5.1.4.1.1.2".into(), vec![1, 0, 1])],
                user_identity: Some((1, b"alice".to_vec())),
            },
        }
    }

    fn small_ac() -> AssociateAc {
        AssociateAc {
            called_ae: "STORESCP".into(),
            calling_ae: "ECHOSCU".into(),
            application_context: APPLICATION_CONTEXT_NAME.into(),
            presentation_contexts: vec![PresentationContextAc {
                id: 1,
                result: presentation_result::ACCEPTANCE,
                transfer_syntax: "1.2.840.10008.1.2".into(),
            }],
            max_pdu_length: 16384,
            implementation_class_uid: "1.2.3.4".into(),
            implementation_version_name: "STORESCP_1".into(),
            async_ops_window: None,
            role_selections: vec![],
        }
    }

    #[test]
    fn parses_echoscu_associate_rq() {
        let pdu = echoscu_rq();
        let (kind, len, body) = split_pdu(&pdu);
        assert_eq!((kind, len), (pdu_type::ASSOCIATE_RQ, 205));
        let rq = parse_associate_rq(body).unwrap();
        assert_eq!(rq.protocol_version, 1);
        assert_eq!(rq.called_ae, "ANY-SCP");
        assert_eq!(rq.calling_ae, "ECHOSCU");
        assert_eq!(rq.application_context, APPLICATION_CONTEXT_NAME);
        assert_eq!(
            rq.presentation_contexts,
            vec![PresentationContextRq {
                id: 1,
                abstract_syntax: "1.2.840.10008.1.1".into(),
                transfer_syntaxes: vec!["1.2.840.10008.1.2".into()],
            }]
        );
        assert_eq!(
            rq.user_info,
            UserInformation {
                max_pdu_length: Some(16384),
                implementation_class_uid: Some("1.2.276.0.7230010.3.0.3.6.8".into()),
                implementation_version_name: Some("OFFIS_DCMTK_368".into()),
                ..UserInformation::default()
            }
        );
        // Our encoder writes the same sub-items in the same order, so it reproduces the
        // literal byte for byte.
        assert_eq!(encode_associate_rq(&rq), pdu);
    }

    #[test]
    fn associate_rq_round_trip() {
        let rq = full_rq();
        let pdu = encode_associate_rq(&rq);
        let (kind, _, body) = split_pdu(&pdu);
        assert_eq!(kind, pdu_type::ASSOCIATE_RQ);
        assert_eq!(parse_associate_rq(body).unwrap(), rq);
    }

    #[test]
    fn encodes_associate_ac_bytes() {
        let expected = [
            // PS3.8 9.3.3 bytes 1-6: type 02, length 159 = 68 + 25 + 29 + 37.
            &[0x02, 0x00, 0x00, 0x00, 0x00, 0x9F][..],
            // Bytes 7-8 protocol version 1, 9-10 reserved.
            &[0x00, 0x01, 0x00, 0x00],
            // Bytes 11-42: the AE titles echoed, space padded.
            b"STORESCP        ",
            b"ECHOSCU         ",
            // Bytes 43-74 reserved.
            &[0u8; 32],
            // Application Context Item (9.3.3.1).
            &[0x10, 0x00, 0x00, 0x15],
            b"1.2.840.10008.3.1.1.1",
            // Presentation Context Item (9.3.3.2): type 21, length 25; ID 1, reserved,
            // result 0 (acceptance), reserved; Transfer Syntax Sub-Item type 40, length 17.
            &[0x21, 0x00, 0x00, 0x19, 0x01, 0x00, 0x00, 0x00],
            &[0x40, 0x00, 0x00, 0x11],
            b"1.2.840.10008.1.2",
            // User Information Item: length 33 = 8 + 11 + 14.
            &[0x50, 0x00, 0x00, 0x21],
            &[0x51, 0x00, 0x00, 0x04, 0x00, 0x00, 0x40, 0x00],
            &[0x52, 0x00, 0x00, 0x07],
            b"1.2.3.4",
            &[0x55, 0x00, 0x00, 0x0A],
            b"STORESCP_1",
        ]
        .concat();
        assert_eq!(encode_associate_ac(&small_ac()), expected);
    }

    #[test]
    fn associate_ac_round_trip() {
        let mut ac = small_ac();
        ac.presentation_contexts.push(PresentationContextAc {
            id: 3,
            result: presentation_result::ABSTRACT_SYNTAX_NOT_SUPPORTED,
            transfer_syntax: String::new(),
        });
        ac.presentation_contexts.push(PresentationContextAc {
            id: 5,
            result: presentation_result::TRANSFER_SYNTAXES_NOT_SUPPORTED,
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
        });
        ac.async_ops_window = Some((1, 1));
        ac.role_selections.push(RoleSelection {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            scu_role: false,
            scp_role: true,
        });
        let pdu = encode_associate_ac(&ac);
        let (kind, _, body) = split_pdu(&pdu);
        assert_eq!(kind, pdu_type::ASSOCIATE_AC);
        // The rejected context still carries its (empty) Transfer Syntax Sub-Item.
        let rejected = [
            0x21, 0x00, 0x00, 0x08, 0x03, 0x00, 0x03, 0x00, 0x40, 0, 0, 0,
        ];
        assert!(body.windows(rejected.len()).any(|w| w == rejected));
        assert_eq!(parse_associate_ac(body).unwrap(), ac);
    }

    #[test]
    fn short_pdus_are_exact() {
        // PS3.8 9.3.4: type 03, reserved, length 4, reserved, result, source, reason.
        assert_eq!(
            encode_associate_rj(
                reject::RESULT_TRANSIENT,
                reject::SOURCE_PROVIDER_PRESENTATION,
                reject::PRESENTATION_LOCAL_LIMIT_EXCEEDED
            ),
            [0x03, 0, 0, 0, 0, 4, 0, 2, 3, 2]
        );
        // 9.3.6 / 9.3.7: four reserved body bytes.
        assert_eq!(encode_release_rq(), [0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]);
        assert_eq!(encode_release_rp(), [0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0]);
        // 9.3.8: two reserved bytes, source, reason.
        let abort_pdu = encode_abort(
            abort::SOURCE_SERVICE_PROVIDER,
            abort::INVALID_PDU_PARAMETER_VALUE,
        );
        assert_eq!(abort_pdu, [0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6]);
        let (kind, _, body) = split_pdu(&abort_pdu);
        assert_eq!(kind, pdu_type::A_ABORT);
        assert_eq!(parse_abort(body), Ok((2, 6)));
        let rj = encode_associate_rj(1, 1, 7);
        assert_eq!(parse_associate_rj(split_pdu(&rj).2), Ok((1, 1, 7)));
        assert!(matches!(
            parse_abort(&[0, 0, 2]),
            Err(PduError::BadFixedLength { length: 3, .. })
        ));
    }

    #[test]
    fn pdu_header_types_and_lengths() {
        assert_eq!(parse_pdu_header(&[0x04, 0, 0, 1, 0, 0]), Ok((0x04, 65536)));
        assert_eq!(parse_pdu_header(&[0x01, 0xFF, 0, 0, 0, 74]), Ok((0x01, 74)));
        for kind in [0x00, 0x08, 0x10, 0xFF] {
            let err = parse_pdu_header(&[kind, 0, 0, 0, 0, 4]).unwrap_err();
            assert_eq!(err, PduError::UnknownPduType(kind));
            assert_eq!(err.abort_reason(), abort::UNRECOGNIZED_PDU);
        }
        // A-RELEASE-RQ with a body PS3.8 does not allow.
        let err = parse_pdu_header(&[0x05, 0, 0xFF, 0xFF, 0xFF, 0xFF]).unwrap_err();
        assert_eq!(err.abort_reason(), abort::INVALID_PDU_PARAMETER_VALUE);
        assert!(check_pdu_length(0x04, 16390, 16384).is_err());
        assert!(check_pdu_length(0x04, 16384, 16384).is_ok());
    }

    #[test]
    fn protocol_version_bit_zero() {
        let mut pdu = echoscu_rq();
        // PDU bytes 7-8 (body offset 0-1): version 2 only.
        pdu[6..8].copy_from_slice(&[0x00, 0x02]);
        let err = parse_associate_rq(&pdu[6..]).unwrap_err();
        assert_eq!(err, PduError::ProtocolVersion(2));
        assert_eq!(err.associate_rj(), Some((1, 2, 2)));
        // Bit 0 plus a future bit is still version 1 to us.
        pdu[6..8].copy_from_slice(&[0x00, 0x03]);
        assert_eq!(parse_associate_rq(&pdu[6..]).unwrap().protocol_version, 3);
    }

    #[test]
    fn truncated_rq_and_ac_never_parse() {
        let rq = echoscu_rq();
        let body = &rq[6..];
        for n in 0..body.len() {
            assert!(parse_associate_rq(&body[..n]).is_err(), "prefix {n}");
        }
        let full = encode_associate_rq(&full_rq());
        for n in 0..full.len() - 6 {
            assert!(parse_associate_rq(&full[6..6 + n]).is_err(), "prefix {n}");
        }
        let ac = encode_associate_ac(&small_ac());
        for n in 0..ac.len() - 6 {
            assert!(parse_associate_ac(&ac[6..6 + n]).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // Every single-byte corruption of a valid RQ, then pseudo-random bodies (xorshift:
        // deterministic, no dependency). Only "returns" is asserted.
        let rq = echoscu_rq();
        for i in 6..rq.len() {
            for v in [0x00, 0x01, 0x7F, 0x80, 0xFF] {
                let mut bad = rq.clone();
                bad[i] = v;
                let _ = parse_associate_rq(&bad[6..]);
                let _ = parse_associate_ac(&bad[6..]);
                let _ = pdvs(&bad[6..]).count();
            }
        }
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..2000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 160) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| (state.rotate_left(i as u32 % 64) & 0xFF) as u8)
                .collect();
            let mut prefixed = rq[6..80].to_vec();
            prefixed.extend_from_slice(&bytes);
            let _ = parse_associate_rq(&bytes);
            let _ = parse_associate_rq(&prefixed);
            let _ = parse_associate_ac(&prefixed);
            let _ = parse_abort(&bytes);
            let _ = pdvs(&bytes).count();
        }
    }

    #[test]
    fn tolerant_padding_and_unknown_items() {
        let mut pdu = echoscu_rq();
        // Called AE with a leading space and NUL padding (PDU bytes 11-26).
        pdu[10..26].copy_from_slice(b" ANY-SCP\0\0\0\0\0\0\0\0");
        let mut body = pdu[6..].to_vec();
        // An unknown variable item (type 0x60) and, inside a new user information item, an
        // unknown sub-item (0x5F) and a UID with a trailing NUL.
        let user_info_at = body.len() - 62;
        body.truncate(user_info_at);
        body.extend_from_slice(&[0x60, 0x00, 0x00, 0x03, 9, 9, 9]);
        body.extend_from_slice(&[0x50, 0x00, 0x00, 0x17]);
        body.extend_from_slice(&[0x5F, 0x00, 0x00, 0x02, 0xAB, 0xCD]);
        body.extend_from_slice(&[0x51, 0x00, 0x00, 0x04, 0x00, 0x00, 0x80, 0x00]);
        body.extend_from_slice(&[0x52, 0x00, 0x00, 0x05]);
        body.extend_from_slice(b"1.23\0");
        let rq = parse_associate_rq(&body).unwrap();
        assert_eq!(rq.called_ae, "ANY-SCP");
        assert_eq!(rq.user_info.max_pdu_length, Some(0x8000));
        assert_eq!(
            rq.user_info.implementation_class_uid.as_deref(),
            Some("1.23")
        );
    }

    #[test]
    fn strict_items() {
        let body = echoscu_rq()[6..].to_vec();
        // A second Application Context Item.
        let mut dup = body.clone();
        dup.extend_from_slice(&[0x10, 0x00, 0x00, 0x01, b'1']);
        let err = parse_associate_rq(&dup).unwrap_err();
        assert_eq!(err, PduError::DuplicateItem("Application Context Item"));
        assert_eq!(err.abort_reason(), abort::UNEXPECTED_PDU_PARAMETER);
        // A Maximum Length Sub-Item of 3 bytes: replace the user information item.
        let mut bad = body[..body.len() - 62].to_vec();
        bad.extend_from_slice(&[0x50, 0x00, 0x00, 0x07, 0x51, 0x00, 0x00, 0x03, 0, 0x40, 0]);
        assert!(matches!(
            parse_associate_rq(&bad),
            Err(PduError::BadItemLength { length: 3, .. })
        ));
        // No User Information Item at all.
        let missing = &body[..body.len() - 62];
        assert_eq!(
            parse_associate_rq(missing),
            Err(PduError::MissingItem("User Information Item"))
        );
    }

    #[test]
    fn pdv_iteration_and_flags() {
        // PS3.8 9.3.5.1: item length (4), context ID (1), control header (1, E.2), data.
        let body = [
            &[0, 0, 0, 4, 1, 0x03, 0xAA, 0xBB][..], // command, last
            &[0, 0, 0, 3, 1, 0x00, 0xCC],           // data set, not last
            &[0, 0, 0, 2, 3, 0x02],                 // data set, last, empty
            &[0, 0, 0, 3, 5, 0xFD, 0xDD],           // reserved bits set: bit 0/1 only count
        ]
        .concat();
        let items: Vec<_> = pdvs(&body).map(Result::unwrap).collect();
        assert_eq!(
            items,
            vec![
                Pdv {
                    context_id: 1,
                    is_command: true,
                    is_last: true,
                    data: &[0xAA, 0xBB]
                },
                Pdv {
                    context_id: 1,
                    is_command: false,
                    is_last: false,
                    data: &[0xCC]
                },
                Pdv {
                    context_id: 3,
                    is_command: false,
                    is_last: true,
                    data: &[]
                },
                Pdv {
                    context_id: 5,
                    is_command: true,
                    is_last: false,
                    data: &[0xDD]
                },
            ]
        );
    }

    #[test]
    fn pdv_errors_end_iteration() {
        // Second item announces 9 bytes, only 3 remain.
        let body = [
            &[0, 0, 0, 3, 1, 0x00, 0xCC][..],
            &[0, 0, 0, 9, 1, 0x02, 0xDD],
        ]
        .concat();
        let mut it = pdvs(&body);
        assert!(it.next().unwrap().is_ok());
        let err = it.next().unwrap().unwrap_err();
        assert!(matches!(
            err,
            PduError::Truncated {
                needed: 9,
                available: 3,
                ..
            }
        ));
        assert!(it.next().is_none());
        // Item length 1 cannot hold ID and control header.
        let mut it = pdvs(&[0, 0, 0, 1, 1, 0, 0, 0, 2, 1, 2]);
        assert!(matches!(
            it.next(),
            Some(Err(PduError::BadItemLength { length: 1, .. }))
        ));
        assert!(it.next().is_none());
        // A dangling partial length field.
        let mut it = pdvs(&[0, 0, 0]);
        assert!(matches!(it.next(), Some(Err(PduError::Truncated { .. }))));
        assert!(it.next().is_none());
        assert!(pdvs(&[]).next().is_none());
    }

    #[test]
    fn p_data_bytes() {
        let mut out = Vec::new();
        encode_p_data(&mut out, 7, true, false, &[1, 2, 3]);
        assert_eq!(out, [0x04, 0, 0, 0, 0, 9, 0, 0, 0, 5, 7, 0x01, 1, 2, 3]);
    }

    /// Splits a buffer of P-DATA-TF PDUs, checking each against `max`, and returns the
    /// reassembled message and the PDU count.
    fn reassemble(mut buf: &[u8], max: u32) -> (Vec<u8>, usize) {
        let mut message = Vec::new();
        let mut pdus = 0;
        let mut seen_last = false;
        while !buf.is_empty() {
            let (header, rest) = buf.split_first_chunk::<6>().unwrap();
            let (kind, len) = parse_pdu_header(header).unwrap();
            assert_eq!(kind, pdu_type::P_DATA_TF);
            if max != 0 {
                assert!(len <= max, "PDU body {len} over {max}");
            }
            let (body, after) = rest.split_at(len as usize);
            for pdv in pdvs(body) {
                let pdv = pdv.unwrap();
                assert!(!seen_last, "fragment after the last one");
                assert_eq!((pdv.context_id, pdv.is_command), (3, false));
                seen_last = pdv.is_last;
                message.extend_from_slice(pdv.data);
            }
            pdus += 1;
            buf = after;
        }
        assert!(seen_last);
        (message, pdus)
    }

    #[test]
    fn fragments_respect_max_length() {
        let message: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        for (max, expected_pdus) in [
            (100, 11),
            (106, 10),
            (16384, 1),
            (0, 1),
            (1006, 1),
            (1005, 2),
        ] {
            let mut out = Vec::new();
            encode_message_fragments(&mut out, 3, false, &message, max);
            let (got, pdus) = reassemble(&out, max);
            assert_eq!(got, message, "max {max}");
            assert_eq!(pdus, expected_pdus, "max {max}");
        }
        // An empty message is one empty last fragment.
        let mut out = Vec::new();
        encode_message_fragments(&mut out, 3, false, &[], 100);
        assert_eq!(out, [0x04, 0, 0, 0, 0, 6, 0, 0, 0, 2, 3, 0x02]);
        // A limit with no room for data still makes progress.
        let mut out = Vec::new();
        encode_message_fragments(&mut out, 3, false, &[1, 2, 3], 4);
        assert_eq!(reassemble(&out, 0), (vec![1, 2, 3], 3));
    }

    #[test]
    fn errors_display_their_field() {
        let err = PduError::Truncated {
            what: "called AE title",
            needed: 16,
            available: 3,
        };
        assert_eq!(
            err.to_string(),
            "called AE title needs 16 bytes but only 3 remain"
        );
        assert_eq!(
            PduError::UnknownPduType(0x42).to_string(),
            "unrecognized PDU type 0x42"
        );
    }
}
