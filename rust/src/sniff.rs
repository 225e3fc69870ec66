//! Streaming sniffer of a data set's leading attributes (PS3.5 section 7: data elements,
//! 7.1 explicit/implicit VR, 7.3 byte order, 7.5 nesting of sequences; annex A transfer
//! syntaxes, A.5 deflate).
//!
//! The data set of a C-STORE arrives in P-DATA fragments of any size; other code writes
//! those bytes to disk unchanged, and this module sees the same bytes to extract, from the
//! top level of the data set only, the few attributes the server needs (UIDs for the file
//! name and checks, and a few descriptive values for events). A [`Sniffer::new`] stops as
//! soon as it sees a top-level tag greater than (0020,000E); after that [`Sniffer::feed`] is
//! a no-op. A [`Sniffer::validating`] one goes on walking the element framing (headers
//! only, values skipped) to the end, so that [`Sniffer::finish`] also reports a data set
//! whose element, item or sequence lengths overrun its end: a file that would not parse.
//!
//! Memory stays bounded whatever the input: a 12-byte pending header, wanted values of at
//! most [`MAX_VALUE_LEN`] bytes, a nesting stack of at most [`MAX_DEPTH`] sequences, and
//! for deflated data sets a fixed inflate window and a fixed output chunk. Values that are
//! not wanted, defined-length sequences and defined-length items are skipped by counting,
//! never copied.

use std::borrow::Cow;
use std::fmt;

use flate2::{Decompress, FlushDecompress, Status};

/// Largest wanted value accepted (bytes); longer is [`SniffError::ValueTooLong`].
pub const MAX_VALUE_LEN: usize = 1024;
/// Deepest nesting of undefined-length sequences accepted; deeper is
/// [`SniffError::TooDeep`].
pub const MAX_DEPTH: usize = 64;
/// Size of the output chunk used when inflating a deflated data set.
const INFLATE_CHUNK: usize = 4096;
/// Undefined length (PS3.5 section 7.1.1).
const UNDEFINED: u32 = 0xFFFF_FFFF;
/// The sniffer is done at the first top-level tag above Series Instance UID (0020,000E).
const LAST_WANTED: u32 = 0x0020_000E;

const ITEM: u32 = 0xFFFE_E000;
const ITEM_DELIMITER: u32 = 0xFFFE_E00D;
const SEQUENCE_DELIMITER: u32 = 0xFFFE_E0DD;

/// Byte encoding of a data set, from its transfer syntax (PS3.5 section 10 and annex A).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Implicit VR Little Endian, 1.2.840.10008.1.2.
    ImplicitVrLittle,
    /// Explicit VR Little Endian: 1.2.840.10008.1.2.1 and every encapsulated (compressed)
    /// transfer syntax.
    ExplicitVrLittle,
    /// Explicit VR Big Endian (retired), 1.2.840.10008.1.2.2.
    ExplicitVrBig,
    /// Deflated Explicit VR Little Endian, 1.2.840.10008.1.2.1.99 (also the JPIP
    /// Referenced Deflate syntaxes 1.2.840.10008.1.2.4.95 and .205): a raw DEFLATE stream
    /// (RFC 1951, no zlib header) of an explicit VR little endian data set.
    DeflatedExplicitVrLittle,
}

impl Encoding {
    /// The data set encoding of a transfer syntax UID (trailing NUL/space padding ignored).
    /// Any UID other than implicit VR LE, explicit VR BE and the deflated ones is explicit
    /// VR LE, as all encapsulated transfer syntaxes are (PS3.5 section A.4).
    pub fn for_transfer_syntax(uid: &str) -> Encoding {
        match uid.trim_end_matches(['\0', ' ']) {
            "1.2.840.10008.1.2" => Encoding::ImplicitVrLittle,
            "1.2.840.10008.1.2.2" => Encoding::ExplicitVrBig,
            "1.2.840.10008.1.2.1.99" | "1.2.840.10008.1.2.4.95" | "1.2.840.10008.1.2.4.205" => {
                Encoding::DeflatedExplicitVrLittle
            }
            _ => Encoding::ExplicitVrLittle,
        }
    }
}

/// The top-level attributes found by a [`Sniffer`]. Text values are decoded in the
/// repertoire of the data set's Specific Character Set (`Repertoire`), trailing NUL and spaces
/// removed (and leading spaces for the non-UID values); an absent or empty value is
/// `None`. A value is kept verbatim otherwise (multi-valued text keeps its `\`
/// delimiters).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DatasetSummary {
    /// Specific Character Set (0008,0005), as written.
    pub specific_character_set: Option<String>,
    /// SOP Class UID (0008,0016).
    pub sop_class_uid: Option<String>,
    /// SOP Instance UID (0008,0018).
    pub sop_instance_uid: Option<String>,
    /// Study Date (0008,0020).
    pub study_date: Option<String>,
    /// Modality (0008,0060).
    pub modality: Option<String>,
    /// Study Description (0008,1030).
    pub study_description: Option<String>,
    /// Patient's Name (0010,0010).
    pub patient_name: Option<String>,
    /// Patient ID (0010,0020).
    pub patient_id: Option<String>,
    /// Study Instance UID (0020,000D).
    pub study_instance_uid: Option<String>,
    /// Series Instance UID (0020,000E).
    pub series_instance_uid: Option<String>,
}

impl DatasetSummary {
    /// Stores a wanted value, text decoded in `repertoire`, which follows a Specific
    /// Character Set value; returns false if `tag` is not wanted.
    fn set(&mut self, tag: u32, raw: &[u8], repertoire: &mut Repertoire) -> bool {
        // Which field, decided twice: the value is decoded before the field it goes to
        // is borrowed.
        let uid = match tag {
            0x0008_0005 | 0x0008_0016 | 0x0008_0018 | 0x0020_000D | 0x0020_000E => true,
            0x0008_0020 | 0x0008_0060 | 0x0008_1030 | 0x0010_0010 | 0x0010_0020 => false,
            _ => return false,
        };
        let s = if uid {
            utf8_lossy(raw)
        } else {
            repertoire.decode(raw)
        };
        let s = s.trim_end_matches(['\0', ' ']);
        let s = if uid { s } else { s.trim_start_matches(' ') };
        let value = (!s.is_empty()).then(|| s.to_owned());
        let field = match tag {
            0x0008_0005 => {
                *repertoire = Repertoire::of(value.as_deref());
                &mut self.specific_character_set
            }
            0x0008_0016 => &mut self.sop_class_uid,
            0x0008_0018 => &mut self.sop_instance_uid,
            0x0008_0020 => &mut self.study_date,
            0x0008_0060 => &mut self.modality,
            0x0008_1030 => &mut self.study_description,
            0x0010_0010 => &mut self.patient_name,
            0x0010_0020 => &mut self.patient_id,
            0x0020_000D => &mut self.study_instance_uid,
            0x0020_000E => &mut self.series_instance_uid,
            _ => return false,
        };
        *field = value;
        true
    }
}

/// `raw` as UTF-8 text, each invalid sequence replaced by U+FFFD; borrowed when valid, as
/// the ASCII of UIDs and code strings always is (checked a word at a time, where the
/// lossy decoder goes byte by byte).
pub(crate) fn utf8_lossy(raw: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(raw) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(raw),
    }
}

/// How text values (PN, LO, ...) are decoded, from the Specific Character Set (PS3.5
/// 6.1): UTF-8 for ISO_IR 192, ISO 8859-1 for ISO_IR 100. Other repertoires (ISO 2022
/// code extensions, other 8-bit sets, GB18030) are decoded as UTF-8 when the bytes are
/// valid UTF-8 and as ISO 8859-1 otherwise: never a replacement character, at worst the
/// wrong glyph for a non-Latin script in the log line and the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Repertoire {
    Utf8,
    Latin1,
    /// Absent, or any other: UTF-8 when valid, else ISO 8859-1.
    #[default]
    Other,
}

impl Repertoire {
    /// The repertoire of a Specific Character Set value (its terms separated by `\`).
    fn of(charset: Option<&str>) -> Repertoire {
        let has = |term: &str| {
            charset
                .unwrap_or_default()
                .split('\\')
                .any(|t| t.trim() == term)
        };
        if has("ISO_IR 192") {
            Repertoire::Utf8
        } else if has("ISO_IR 100") {
            Repertoire::Latin1
        } else {
            Repertoire::Other
        }
    }

    fn decode(self, raw: &[u8]) -> Cow<'_, str> {
        let latin1 = |raw: &[u8]| raw.iter().map(|&b| char::from(b)).collect::<String>();
        match self {
            Repertoire::Utf8 => utf8_lossy(raw),
            // ASCII reads the same in ISO 8859-1: no copy for the usual value.
            Repertoire::Latin1 if !raw.is_ascii() => latin1(raw).into(),
            Repertoire::Latin1 | Repertoire::Other => match std::str::from_utf8(raw) {
                Ok(text) => text.into(),
                Err(_) => latin1(raw).into(),
            },
        }
    }
}

fn is_wanted(tag: u32) -> bool {
    matches!(
        tag,
        0x0008_0005
            | 0x0008_0016
            | 0x0008_0018
            | 0x0008_0020
            | 0x0008_0060
            | 0x0008_1030
            | 0x0010_0010
            | 0x0010_0020
            | 0x0020_000D
            | 0x0020_000E
    )
}

/// Why a data set could not be sniffed. Offsets count bytes from the start of the data
/// set (of the inflated stream for deflated data sets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniffError {
    /// An explicit VR element has a VR that PS3.5 table 6.2-1 does not define.
    UnknownVr {
        /// Offset of the element.
        offset: u64,
        /// The two VR bytes found.
        vr: [u8; 2],
    },
    /// The element structure is invalid (e.g. a non-item inside a sequence, a stray
    /// delimiter, an undefined length on a VR that cannot have one).
    Malformed {
        /// Offset of the element.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A wanted top-level value is longer than [`MAX_VALUE_LEN`].
    ValueTooLong {
        /// Tag as `(group << 16) | element`.
        tag: u32,
        /// Its value length.
        length: u32,
    },
    /// Undefined-length sequences nested deeper than [`MAX_DEPTH`].
    TooDeep {
        /// Offset of the sequence that is too deep.
        offset: u64,
    },
    /// The deflated data set is not a valid DEFLATE stream.
    Inflate(String),
    /// The data ended inside an element or nested sequence before the sniffer was done.
    Truncated,
}

impl fmt::Display for SniffError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SniffError::UnknownVr { offset, vr } => write!(
                f,
                "unknown VR {:02X}{:02X} at data set offset {offset}",
                vr[0], vr[1]
            ),
            SniffError::Malformed { offset, reason } => {
                write!(f, "malformed data set at offset {offset}: {reason}")
            }
            SniffError::ValueTooLong { tag, length } => write!(
                f,
                "value of ({:04X},{:04X}) too long ({length} bytes)",
                tag >> 16,
                tag & 0xFFFF
            ),
            SniffError::TooDeep { offset } => {
                write!(f, "sequences nested too deep at data set offset {offset}")
            }
            SniffError::Inflate(e) => write!(f, "deflated data set: {e}"),
            SniffError::Truncated => f.write_str("data set truncated"),
        }
    }
}

impl std::error::Error for SniffError {}

/// How elements are encoded in the current context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Syntax {
    implicit: bool,
    big: bool,
}

impl Syntax {
    /// CP-246: the value of an undefined-length UN is implicit VR little endian.
    const IMPLICIT_LE: Syntax = Syntax {
        implicit: true,
        big: false,
    };

    fn u16(self, b: [u8; 2]) -> u16 {
        if self.big {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }

    fn u32(self, b: [u8; 4]) -> u32 {
        if self.big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }
}

/// An open undefined-length container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// Inside a sequence: expecting items or the sequence delimiter.
    Sequence(Syntax),
    /// Inside an item: expecting elements or the item delimiter.
    Item(Syntax),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading an element/item header into `hdr`.
    Header,
    /// Skipping this many value bytes.
    Skip(u32),
    /// Copying a wanted top-level value into `value`; this many bytes still to come.
    Collect { tag: u32, remaining: u32 },
    /// Found a top-level tag above (0020,000E): nothing more to do.
    Done,
}

/// Explicit VR value length form (PS3.5 section 7.1.2): `Some(true)` for the VRs with a
/// 2-byte reserved field and a 4-byte length, `Some(false)` for a 2-byte length, `None`
/// for an unknown VR.
fn long_vr(vr: [u8; 2]) -> Option<bool> {
    match &vr {
        b"OB" | b"OD" | b"OF" | b"OL" | b"OV" | b"OW" | b"SQ" | b"SV" | b"UC" | b"UN" | b"UR"
        | b"UT" | b"UV" => Some(true),
        b"AE" | b"AS" | b"AT" | b"CS" | b"DA" | b"DS" | b"DT" | b"FD" | b"FL" | b"IS" | b"LO"
        | b"LT" | b"PN" | b"SH" | b"SL" | b"SS" | b"ST" | b"TM" | b"UI" | b"UL" | b"US" => {
            Some(false)
        }
        _ => None,
    }
}

/// The element-level state machine over the plain (inflated) data set bytes.
#[derive(Debug)]
struct Parser {
    base: Syntax,
    state: State,
    hdr: [u8; 12],
    hdr_len: usize,
    stack: Vec<Frame>,
    sequences: usize,
    value: Vec<u8>,
    summary: DatasetSummary,
    /// How the text values are decoded, from the Specific Character Set seen so far.
    repertoire: Repertoire,
    /// Bytes consumed so far.
    pos: u64,
    /// Walk the framing to the end instead of stopping after (0020,000E).
    walk_to_end: bool,
    /// A top-level tag above (0020,000E) was seen: no more values are collected.
    summary_final: bool,
}

impl Parser {
    fn new(base: Syntax, walk_to_end: bool) -> Parser {
        Parser {
            walk_to_end,
            summary_final: false,
            base,
            state: State::Header,
            hdr: [0; 12],
            hdr_len: 0,
            stack: Vec::new(),
            sequences: 0,
            value: Vec::new(),
            summary: DatasetSummary::default(),
            repertoire: Repertoire::default(),
            pos: 0,
        }
    }

    fn is_done(&self) -> bool {
        self.state == State::Done
    }

    fn feed(&mut self, mut input: &[u8]) -> Result<(), SniffError> {
        while !input.is_empty() {
            match self.state {
                State::Done => return Ok(()),
                State::Header => self.header(&mut input)?,
                State::Skip(n) => {
                    let k = input.len().min(n as usize);
                    input = input.get(k..).unwrap_or_default();
                    self.pos += k as u64;
                    let left = n - k as u32;
                    self.state = if left == 0 {
                        State::Header
                    } else {
                        State::Skip(left)
                    };
                }
                State::Collect { tag, remaining } => {
                    let k = input.len().min(remaining as usize);
                    let (chunk, rest) = input.split_at(k);
                    input = rest;
                    self.pos += k as u64;
                    let left = remaining - k as u32;
                    if left > 0 {
                        if self.value.is_empty() {
                            // At most MAX_VALUE_LEN, checked before entering Collect.
                            self.value.reserve_exact(remaining as usize);
                        }
                        self.value.extend_from_slice(chunk);
                        self.state = State::Collect {
                            tag,
                            remaining: left,
                        };
                    } else {
                        if self.value.is_empty() {
                            // The whole value was in this fragment: no copy.
                            self.summary.set(tag, chunk, &mut self.repertoire);
                        } else {
                            self.value.extend_from_slice(chunk);
                            self.summary.set(tag, &self.value, &mut self.repertoire);
                            self.value.clear();
                        }
                        self.state = State::Header;
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves bytes from `input` into the header buffer until it holds `need` bytes;
    /// false if `input` ran out first.
    fn fill(&mut self, input: &mut &[u8], need: usize) -> bool {
        if self.hdr_len < need {
            let k = (need - self.hdr_len).min(input.len());
            let (chunk, rest) = input.split_at(k);
            if let Some(dst) = self.hdr.get_mut(self.hdr_len..self.hdr_len + k) {
                // At most 12 bytes, twice per element: a loop, not a call to memcpy.
                for (d, s) in dst.iter_mut().zip(chunk) {
                    *d = *s;
                }
            }
            *input = rest;
            self.hdr_len += k;
            self.pos += k as u64;
        }
        self.hdr_len >= need
    }

    fn hdr2(&self, at: usize) -> [u8; 2] {
        [self.hdr[at], self.hdr[at + 1]]
    }

    fn hdr4(&self, at: usize) -> [u8; 4] {
        [
            self.hdr[at],
            self.hdr[at + 1],
            self.hdr[at + 2],
            self.hdr[at + 3],
        ]
    }

    fn malformed(&self, reason: &'static str) -> SniffError {
        SniffError::Malformed {
            offset: self.pos - self.hdr_len as u64,
            reason,
        }
    }

    fn push_sequence(&mut self, syntax: Syntax) -> Result<(), SniffError> {
        if self.sequences >= MAX_DEPTH {
            return Err(SniffError::TooDeep {
                offset: self.pos - self.hdr_len as u64,
            });
        }
        self.sequences += 1;
        self.stack.push(Frame::Sequence(syntax));
        Ok(())
    }

    /// Reads one header (possibly across calls) and acts on it. Indexes into `hdr` are
    /// constants below its 12-byte size.
    fn header(&mut self, input: &mut &[u8]) -> Result<(), SniffError> {
        let (syntax, in_sequence) = match self.stack.last() {
            None => (self.base, false),
            Some(Frame::Sequence(s)) => (*s, true),
            Some(Frame::Item(s)) => (*s, false),
        };
        if !self.fill(input, 4) {
            return Ok(());
        }
        let tag = (u32::from(syntax.u16(self.hdr2(0))) << 16) | u32::from(syntax.u16(self.hdr2(2)));
        if self.stack.is_empty() && tag > LAST_WANTED {
            self.summary_final = true;
            if !self.walk_to_end {
                self.state = State::Done;
                self.hdr_len = 0;
                return Ok(());
            }
        }
        if in_sequence || tag >> 16 == 0xFFFE {
            // Item and delimiter tags never have a VR (PS3.5 section 7.5).
            if !self.fill(input, 8) {
                return Ok(());
            }
            let length = syntax.u32(self.hdr4(4));
            match (in_sequence, tag) {
                (true, ITEM) if length == UNDEFINED => self.stack.push(Frame::Item(syntax)),
                (true, ITEM) => self.skip(length),
                (true, SEQUENCE_DELIMITER) => {
                    // Its length should be 0; like other toolkits, it is not checked.
                    self.stack.pop();
                    self.sequences = self.sequences.saturating_sub(1);
                }
                (false, ITEM_DELIMITER) => {
                    self.stack.pop();
                }
                (true, _) => return Err(self.malformed("expected an item in a sequence")),
                (false, _) => return Err(self.malformed("unexpected item or delimiter tag")),
            }
            self.hdr_len = 0;
            return Ok(());
        }
        let (length, is_sequence) = if syntax.implicit {
            if !self.fill(input, 8) {
                return Ok(());
            }
            let length = syntax.u32(self.hdr4(4));
            if length == UNDEFINED {
                // Implicit VR: only a sequence has an undefined length (PS3.5 7.5.1).
                self.push_sequence(syntax)?;
                self.hdr_len = 0;
                return Ok(());
            }
            (length, false)
        } else {
            if !self.fill(input, 6) {
                return Ok(());
            }
            let vr = self.hdr2(4);
            let long = long_vr(vr).ok_or(SniffError::UnknownVr {
                offset: self.pos - self.hdr_len as u64,
                vr,
            })?;
            if long {
                if !self.fill(input, 12) {
                    return Ok(());
                }
                let length = syntax.u32(self.hdr4(8));
                if length == UNDEFINED {
                    match &vr {
                        b"SQ" => self.push_sequence(syntax)?,
                        // CP-246: an undefined-length UN holds an implicit VR LE sequence.
                        b"UN" => self.push_sequence(Syntax::IMPLICIT_LE)?,
                        // Encapsulated pixel data: fragments are defined-length items.
                        b"OB" | b"OW" => self.push_sequence(syntax)?,
                        _ => return Err(self.malformed("undefined length on a non-sequence VR")),
                    }
                    self.hdr_len = 0;
                    return Ok(());
                }
                (length, &vr == b"SQ")
            } else {
                if !self.fill(input, 8) {
                    return Ok(());
                }
                (u32::from(syntax.u16(self.hdr2(6))), false)
            }
        };
        self.hdr_len = 0;
        if self.stack.is_empty() && !is_sequence && !self.summary_final && is_wanted(tag) {
            if length as usize > MAX_VALUE_LEN {
                return Err(SniffError::ValueTooLong { tag, length });
            }
            if length == 0 {
                self.summary.set(tag, &[], &mut self.repertoire);
            } else {
                self.value.clear();
                self.state = State::Collect {
                    tag,
                    remaining: length,
                };
            }
        } else {
            self.skip(length);
        }
        Ok(())
    }

    fn skip(&mut self, length: u32) {
        if length > 0 {
            self.state = State::Skip(length);
        }
    }

    fn finish(self) -> Result<DatasetSummary, SniffError> {
        let complete = match self.state {
            State::Done => true,
            State::Header => self.hdr_len == 0 && self.stack.is_empty(),
            State::Skip(_) | State::Collect { .. } => false,
        };
        if complete {
            Ok(self.summary)
        } else {
            Err(SniffError::Truncated)
        }
    }
}

/// Incremental raw-DEFLATE front end of a deflated data set.
struct Inflater {
    stream: Decompress,
    ended: bool,
}

impl fmt::Debug for Inflater {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inflater")
            .field("total_in", &self.stream.total_in())
            .field("total_out", &self.stream.total_out())
            .field("ended", &self.ended)
            .finish()
    }
}

impl Inflater {
    /// Inflates `input` chunk by chunk into `parser`, stopping as soon as the parser is
    /// done or the stream ends. Only a fixed-size chunk is ever held.
    fn feed(&mut self, parser: &mut Parser, mut input: &[u8]) -> Result<(), SniffError> {
        let mut out = [0u8; INFLATE_CHUNK];
        while !self.ended && !parser.is_done() {
            let (in_before, out_before) = (self.stream.total_in(), self.stream.total_out());
            let result = self
                .stream
                .decompress(input, &mut out, FlushDecompress::None);
            let consumed = (self.stream.total_in() - in_before) as usize;
            let produced = (self.stream.total_out() - out_before) as usize;
            input = input.get(consumed..).unwrap_or_default();
            // A failing call may still have produced bytes: parse them before judging the
            // error, so that the outcome does not depend on where the fragments split.
            parser.feed(out.get(..produced).unwrap_or_default())?;
            let status = match result {
                Ok(status) => status,
                Err(_) if parser.is_done() => break,
                Err(e) => return Err(SniffError::Inflate(e.to_string())),
            };
            if status == Status::StreamEnd {
                self.ended = true;
            }
            if consumed == 0 && produced == 0 {
                break;
            }
        }
        Ok(())
    }
}

/// Streaming sniffer of one data set; see the module documentation.
#[derive(Debug)]
pub struct Sniffer {
    parser: Parser,
    inflater: Option<Box<Inflater>>,
    error: Option<SniffError>,
}

impl Sniffer {
    /// A sniffer for a data set in `encoding`, before its first byte, that stops after
    /// (0020,000E).
    pub fn new(encoding: Encoding) -> Sniffer {
        Sniffer::with_mode(encoding, false)
    }

    /// A sniffer that also walks the element framing to the end of the data set (and
    /// inflates all of a deflated one): [`Sniffer::finish`] then fails unless the data set
    /// ends exactly after a complete top-level element. Never done before `finish`.
    pub fn validating(encoding: Encoding) -> Sniffer {
        Sniffer::with_mode(encoding, true)
    }

    fn with_mode(encoding: Encoding, walk_to_end: bool) -> Sniffer {
        let (implicit, big) = match encoding {
            Encoding::ImplicitVrLittle => (true, false),
            Encoding::ExplicitVrBig => (false, true),
            Encoding::ExplicitVrLittle | Encoding::DeflatedExplicitVrLittle => (false, false),
        };
        let inflater = (encoding == Encoding::DeflatedExplicitVrLittle).then(|| {
            Box::new(Inflater {
                stream: Decompress::new(false),
                ended: false,
            })
        });
        Sniffer {
            parser: Parser::new(Syntax { implicit, big }, walk_to_end),
            inflater,
            error: None,
        }
    }

    /// Feeds the next bytes of the data set (any split is fine, even one byte at a time).
    /// Once the sniffer is done this returns `Ok(())` at once; after an error, this and
    /// later calls return that error.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), SniffError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.parser.is_done() {
            return Ok(());
        }
        let result = match &mut self.inflater {
            None => self.parser.feed(bytes),
            Some(inflater) => inflater.feed(&mut self.parser, bytes),
        };
        if let Err(e) = &result {
            self.error = Some(e.clone());
        }
        result
    }

    /// True once further bytes cannot change the result: a top-level tag above
    /// (0020,000E) was seen by a non-validating sniffer.
    pub fn is_done(&self) -> bool {
        self.parser.is_done()
    }

    /// What was found, once it can no longer change: a top-level tag above (0020,000E)
    /// was seen (a validating sniffer may still fail later, in [`Sniffer::finish`]).
    pub fn settled_summary(&self) -> Option<&DatasetSummary> {
        (self.error.is_none() && self.parser.summary_final).then_some(&self.parser.summary)
    }

    /// Ends the data set and returns what was found. [`SniffError::Truncated`] if the data
    /// ended inside an element, a nested sequence or (deflated) the DEFLATE stream before
    /// the sniffer was done; the first error of [`Sniffer::feed`] if there was one.
    pub fn finish(self) -> Result<DatasetSummary, SniffError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if !self.parser.is_done() && self.inflater.as_ref().is_some_and(|i| !i.ended) {
            return Err(SniffError::Truncated);
        }
        self.parser.finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Enc {
        Imp,
        Le,
        Be,
    }

    const ALL: [Enc; 3] = [Enc::Imp, Enc::Le, Enc::Be];

    fn encoding(e: Enc) -> Encoding {
        match e {
            Enc::Imp => Encoding::ImplicitVrLittle,
            Enc::Le => Encoding::ExplicitVrLittle,
            Enc::Be => Encoding::ExplicitVrBig,
        }
    }

    /// Data set builder in one of the three plain encodings.
    struct B {
        enc: Enc,
        out: Vec<u8>,
    }

    impl B {
        fn new(enc: Enc) -> B {
            B {
                enc,
                out: Vec::new(),
            }
        }
        fn u16(mut self, v: u16) -> B {
            let b = if self.enc == Enc::Be {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            self.out.extend_from_slice(&b);
            self
        }
        fn u32(mut self, v: u32) -> B {
            let b = if self.enc == Enc::Be {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            self.out.extend_from_slice(&b);
            self
        }
        fn tag(self, tag: u32) -> B {
            self.u16((tag >> 16) as u16).u16(tag as u16)
        }
        fn raw(mut self, b: &[u8]) -> B {
            self.out.extend_from_slice(b);
            self
        }
        /// Element header with a 4-byte length in explicit VR (`vr` must be a long VR
        /// then) or implicit VR.
        fn long_header(self, tag: u32, vr: &[u8; 2], len: u32) -> B {
            let b = self.tag(tag);
            match b.enc {
                Enc::Imp => b.u32(len),
                _ => b.raw(vr).raw(&[0, 0]).u32(len),
            }
        }
        fn el(self, tag: u32, vr: &[u8; 2], value: &[u8]) -> B {
            let b = if self.enc == Enc::Imp || long_vr(*vr) == Some(true) {
                self.long_header(tag, vr, value.len() as u32)
            } else {
                self.tag(tag).raw(vr).u16(value.len() as u16)
            };
            b.raw(value)
        }
        fn text(self, tag: u32, vr: &[u8; 2], s: &str) -> B {
            let mut v = s.as_bytes().to_vec();
            if v.len() % 2 == 1 {
                v.push(if vr == b"UI" { 0 } else { b' ' });
            }
            self.el(tag, vr, &v)
        }
        fn sq(self, tag: u32) -> B {
            self.long_header(tag, b"SQ", UNDEFINED)
        }
        fn sq_def(self, tag: u32, content: &[u8]) -> B {
            self.long_header(tag, b"SQ", content.len() as u32)
                .raw(content)
        }
        fn un(self, tag: u32) -> B {
            self.long_header(tag, b"UN", UNDEFINED)
        }
        fn ob_undef(self, tag: u32) -> B {
            self.long_header(tag, b"OB", UNDEFINED)
        }
        fn item(self) -> B {
            self.tag(ITEM).u32(UNDEFINED)
        }
        fn item_def(self, content: &[u8]) -> B {
            self.tag(ITEM).u32(content.len() as u32).raw(content)
        }
        fn item_end(self) -> B {
            self.tag(ITEM_DELIMITER).u32(0)
        }
        fn seq_end(self) -> B {
            self.tag(SEQUENCE_DELIMITER).u32(0)
        }
    }

    /// A data set as its top-level elements, with sequences, items, CP-246 UN and
    /// decoys of the wanted tags nested before the real values. `blobs` adds large values
    /// that are skipped; `tail` adds elements after (0020,000E).
    fn sample(enc: Enc, tail: bool, blobs: bool) -> Vec<Vec<u8>> {
        let b = || B::new(enc);
        let imp = || B::new(Enc::Imp);
        let mut c = vec![
            b().text(0x0008_0005, b"CS", "ISO_IR 192").out,
            b().text(0x0008_0008, b"CS", "ORIGINAL\\PRIMARY").out,
            b().text(0x0008_0016, b"UI", "1.2.840.10008.5.1.4.1.1.2")
                .out,
            b().text(0x0008_0018, b"UI", "1.2.3.4.5.6.7").out,
            b().text(0x0008_0020, b"DA", "20240229").out,
            b().text(0x0008_0060, b"CS", "CT").out,
            b().text(0x0008_1030, b"LO", "  Head^Neck").out,
            b().sq(0x0008_1110)
                .item()
                .text(0x0008_0018, b"UI", "9.9.9")
                .sq(0x0008_1115)
                .item_def(&b().text(0x0020_000E, b"UI", "9.8").out)
                .item()
                .text(0x0020_000D, b"UI", "9.7")
                .text(0x0020_0013, b"IS", "5")
                .item_end()
                .item()
                .item_end()
                .seq_end()
                .sq(0x0008_1199)
                .seq_end()
                .sq_def(
                    0x0008_1198,
                    &b().item_def(&b().text(0x0010_0010, b"PN", "Decoy^Def").out)
                        .out,
                )
                .sq(0x0088_0200)
                .item()
                .ob_undef(0x7FE0_0010)
                .item_def(&[])
                .item_def(&[1, 2, 3, 4])
                .seq_end()
                .item_end()
                .seq_end()
                .item_end()
                .item_def(&b().text(0x0010_0020, b"LO", "DECOY").out)
                .seq_end()
                .out,
            b().sq_def(
                0x0008_1111,
                &b().item_def(&b().text(0x0020_000D, b"UI", "6.6").out).out,
            )
            .out,
            b().sq_def(0x0008_1140, &[]).out,
            b().text(0x0009_0010, b"LO", "PRIVATE").out,
            // CP-246: undefined-length UN, contents implicit VR LE whatever `enc`.
            b().un(0x0009_1001)
                .raw(
                    &imp()
                        .item()
                        .text(0x0010_0010, b"PN", "Decoy^UN")
                        .sq(0x0008_1115)
                        .item()
                        .text(0x0020_000D, b"UI", "5.5")
                        .item_end()
                        .seq_end()
                        .item_end()
                        .item_def(&imp().text(0x0020_000E, b"UI", "5.4").out)
                        .seq_end()
                        .out,
                )
                .out,
            b().el(0x0009_1002, b"UN", &[1, 2, 3, 4]).out,
            b().text(0x0010_0010, b"PN", "Doe^John").out,
            b().text(0x0010_0020, b"LO", "ID1").out,
            b().el(0x0010_0030, b"DA", b"").out,
        ];
        if blobs {
            c.push(b().el(0x0019_1001, b"OB", &[0xAB; 3000]).out);
            c.push(b().el(0x0019_1002, b"UT", "x".repeat(2000).as_bytes()).out);
            c.push(b().el(0x0019_1003, b"LT", "y".repeat(1500).as_bytes()).out);
        }
        c.push(b().text(0x0020_000D, b"UI", "1.2.3.4").out);
        c.push(b().text(0x0020_000E, b"UI", "1.2.3.4.5").out);
        if tail {
            c.push(b().text(0x0020_0010, b"SH", "1").out);
            c.push(
                b().ob_undef(0x7FE0_0010)
                    .item_def(&[])
                    .item_def(&[0xFF; 10])
                    .seq_end()
                    .out,
            );
        }
        c
    }

    fn expected() -> DatasetSummary {
        DatasetSummary {
            specific_character_set: Some("ISO_IR 192".into()),
            sop_class_uid: Some("1.2.840.10008.5.1.4.1.1.2".into()),
            sop_instance_uid: Some("1.2.3.4.5.6.7".into()),
            study_date: Some("20240229".into()),
            modality: Some("CT".into()),
            study_description: Some("Head^Neck".into()),
            patient_name: Some("Doe^John".into()),
            patient_id: Some("ID1".into()),
            study_instance_uid: Some("1.2.3.4".into()),
            series_instance_uid: Some("1.2.3.4.5".into()),
        }
    }

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Feeds `parts` in order; returns (done after the last part, finish result).
    fn sniff(encoding: Encoding, parts: &[&[u8]]) -> (bool, Result<DatasetSummary, SniffError>) {
        let mut s = Sniffer::new(encoding);
        for p in parts {
            if s.feed(p).is_err() {
                break;
            }
        }
        (s.is_done(), s.finish())
    }

    /// Whole, one byte at a time, and split in two at every offset: all give `want`.
    fn check_all_splits(
        encoding: Encoding,
        data: &[u8],
        want_done: bool,
        want: &Result<DatasetSummary, SniffError>,
    ) {
        assert_eq!(&sniff(encoding, &[data]), &(want_done, want.clone()));
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(&sniff(encoding, &bytes), &(want_done, want.clone()));
        for i in 0..=data.len() {
            let (a, b) = data.split_at(i);
            assert_eq!(
                &sniff(encoding, &[a, &[], b]),
                &(want_done, want.clone()),
                "split at {i}"
            );
        }
    }

    fn hex(lines: &[&str]) -> Vec<u8> {
        let s: String = lines.concat();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn validate(encoding: Encoding, data: &[u8]) -> Result<DatasetSummary, SniffError> {
        let mut s = Sniffer::validating(encoding);
        s.feed(data)?;
        assert!(!s.is_done());
        s.finish()
    }

    /// A validating sniffer finds the same values, accepts a data set that ends after a
    /// whole element, and refuses one whose framing after (0020,000E) overruns its end.
    #[test]
    fn validating_walks_to_the_end() {
        for enc in ALL {
            let e = encoding(enc);
            let whole = sample(enc, true, true).concat();
            assert_eq!(validate(e, &whole), Ok(expected()), "{enc:?}");
            assert_eq!(
                validate(Encoding::DeflatedExplicitVrLittle, &deflate(&whole)).is_ok(),
                enc == Enc::Le
            );
            let head = sample(enc, false, false).concat();
            let b = || B::new(enc);
            for (what, tail) in [
                (
                    "value overruns",
                    b().long_header(0x7FE0_0010, b"OB", 100).raw(&[0; 10]).out,
                ),
                (
                    "sequence never closed",
                    b().sq(0x0040_0275).item().item_end().out,
                ),
                (
                    "item overruns",
                    b().sq(0x0040_0275).tag(ITEM).u32(50).raw(&[0; 8]).out,
                ),
                ("header cut", b().tag(0x0040_0275).out),
            ] {
                let data = [head.as_slice(), &tail].concat();
                assert_eq!(
                    validate(e, &data),
                    Err(SniffError::Truncated),
                    "{enc:?} {what}"
                );
                let (done, plain) = sniff(e, &[&data]);
                assert!(
                    done && plain.is_ok(),
                    "{enc:?} {what}: the plain sniffer stops early"
                );
            }
        }
        let cut = deflate(&[sample(Enc::Le, false, false).concat(), vec![0x10, 0, 0x10]].concat());
        assert!(validate(Encoding::DeflatedExplicitVrLittle, &cut).is_err());
    }

    #[test]
    fn transfer_syntaxes() {
        use Encoding::*;
        for (uid, e) in [
            ("1.2.840.10008.1.2", ImplicitVrLittle),
            ("1.2.840.10008.1.2\0", ImplicitVrLittle),
            ("1.2.840.10008.1.2.1", ExplicitVrLittle),
            ("1.2.840.10008.1.2.2", ExplicitVrBig),
            ("1.2.840.10008.1.2.1.99", DeflatedExplicitVrLittle),
            ("1.2.840.10008.1.2.4.95", DeflatedExplicitVrLittle),
            ("1.2.840.10008.1.2.4.50", ExplicitVrLittle),
            ("1.2.840.10008.1.2.4.80", ExplicitVrLittle),
            ("1.2.840.10008.1.2.4.90", ExplicitVrLittle),
            ("1.2.840.10008.1.2.4.201", ExplicitVrLittle),
            ("1.2.840.10008.1.2.5", ExplicitVrLittle),
            ("1.2.840.10008.1.2.4.100", ExplicitVrLittle),
            ("1.2.840.10008.1.2.1.98", ExplicitVrLittle),
        ] {
            assert_eq!(Encoding::for_transfer_syntax(uid), e, "{uid}");
        }
    }

    /// Written by pydicom 3.0 (`write_dataset`, explicit VR LE) with an undefined-length
    /// sequence (0008,1110) of an undefined-length item holding decoy UIDs and a nested
    /// undefined-length sequence, then a defined-length item; (0020,0013) follows the UIDs.
    const PYDICOM_EXPLICIT: [&str; 7] = [
        "0800160055491a00312e322e3834302e31303030382e352e312e342e312e312e37000800180055490a00312e322e332e",
        "342e35000800200044410800323032343032323908006000435302004f54080030104c4f0600427261696e2008001011",
        "53510000fffffffffeff00e0ffffffff0800151153510000fffffffffeff00e0ffffffff20000e0055490400382e3800",
        "feff0de000000000feffdde0000000000800501155490600312e322e39000800551155490600392e392e3900feff0de0",
        "00000000feff00e00c00000020000d0055490400372e3700feffdde00000000010001000504e0800446f655e4a616e65",
        "100020004c4f0200503120000d0055490600312e322e330020000e0055490800312e322e332e34002000130049530200",
        "3120",
    ];
    /// The same data set written by pydicom in implicit VR LE.
    const PYDICOM_IMPLICIT: [&str; 6] = [
        "080016001a000000312e322e3834302e31303030382e352e312e342e312e312e3700080018000a000000312e322e332e",
        "342e35000800200008000000323032343032323908006000020000004f540800301006000000427261696e2008001011",
        "fffffffffeff00e0ffffffff08001511fffffffffeff00e0ffffffff20000e0004000000382e3800feff0de000000000",
        "feffdde0000000000800501106000000312e322e39000800551106000000392e392e3900feff0de000000000feff00e0",
        "0c00000020000d0004000000372e3700feffdde0000000001000100008000000446f655e4a616e651000200002000000",
        "503120000d0006000000312e322e330020000e0008000000312e322e332e340020001300020000003120",
    ];

    fn decode_text<'a>(raw: &'a [u8], charset: Option<&str>) -> Cow<'a, str> {
        Repertoire::of(charset).decode(raw)
    }

    #[test]
    fn text_follows_the_specific_character_set() {
        let latin1 = b"M\xfcller^J\xfcrgen";
        assert_eq!(decode_text(latin1, Some("ISO_IR 100")), "Müller^Jürgen");
        // The usual value, ASCII, is not copied.
        assert!(matches!(
            decode_text(b"DOE^JOHN", Some("ISO_IR 100")),
            Cow::Borrowed("DOE^JOHN")
        ));
        assert_eq!(
            decode_text("Müller".as_bytes(), Some("ISO_IR 192")),
            "Müller"
        );
        // Undeclared or other repertoires: UTF-8 when valid, else ISO 8859-1.
        assert_eq!(decode_text("Müller".as_bytes(), None), "Müller");
        assert_eq!(decode_text(latin1, None), "Müller^Jürgen");
        assert_eq!(
            decode_text(latin1, Some("\\ISO 2022 IR 100")),
            "Müller^Jürgen"
        );
    }

    /// The repertoire named by (0008,0005) decodes the text values after it, whatever
    /// the fragment boundaries.
    #[test]
    fn text_values_follow_the_data_sets_character_set() {
        let b = || B::new(Enc::Le);
        let data = [
            b().text(0x0008_0005, b"CS", "ISO_IR 100").out,
            b().text(0x0008_0018, b"UI", "1.2.3").out,
            // Valid UTF-8 too ("Müller"), but ISO 8859-1 reads these bytes otherwise.
            b().el(0x0010_0010, b"PN", b"M\xc3\xbcller").out,
            b().text(0x0020_000D, b"UI", "1.2").out,
        ]
        .concat();
        let want = Ok(DatasetSummary {
            specific_character_set: Some("ISO_IR 100".into()),
            sop_instance_uid: Some("1.2.3".into()),
            patient_name: Some("MÃ¼ller".into()),
            study_instance_uid: Some("1.2".into()),
            ..DatasetSummary::default()
        });
        check_all_splits(Encoding::ExplicitVrLittle, &data, false, &want);
    }

    #[test]
    fn pydicom_fixtures() {
        let want = Ok(DatasetSummary {
            specific_character_set: None,
            sop_class_uid: Some("1.2.840.10008.5.1.4.1.1.7".into()),
            sop_instance_uid: Some("1.2.3.4.5".into()),
            study_date: Some("20240229".into()),
            modality: Some("OT".into()),
            study_description: Some("Brain".into()),
            patient_name: Some("Doe^Jane".into()),
            patient_id: Some("P1".into()),
            study_instance_uid: Some("1.2.3".into()),
            series_instance_uid: Some("1.2.3.4".into()),
        });
        let explicit = hex(&PYDICOM_EXPLICIT);
        check_all_splits(Encoding::ExplicitVrLittle, &explicit, true, &want);
        check_all_splits(
            Encoding::DeflatedExplicitVrLittle,
            &deflate(&explicit),
            true,
            &want,
        );
        check_all_splits(
            Encoding::ImplicitVrLittle,
            &hex(&PYDICOM_IMPLICIT),
            true,
            &want,
        );
    }

    #[test]
    fn built_data_sets_in_every_encoding_and_split() {
        for enc in ALL {
            for tail in [false, true] {
                let data = sample(enc, tail, true).concat();
                check_all_splits(encoding(enc), &data, tail, &Ok(expected()));
                if enc == Enc::Le {
                    let z = deflate(&data);
                    check_all_splits(
                        Encoding::DeflatedExplicitVrLittle,
                        &z,
                        tail,
                        &Ok(expected()),
                    );
                }
            }
        }
    }

    #[test]
    fn truncations() {
        for enc in ALL {
            let chunks = sample(enc, false, true);
            let data = chunks.concat();
            let mut boundaries = vec![0];
            for c in &chunks {
                boundaries.push(boundaries.last().unwrap() + c.len());
            }
            for n in 0..=data.len() {
                let (done, r) = sniff(encoding(enc), &[&data[..n]]);
                assert!(!done);
                if let Some(k) = boundaries.iter().position(|&b| b == n) {
                    let s = r.unwrap();
                    // The SOP Class UID is the third top-level element.
                    assert_eq!(s.sop_class_uid.is_some(), k >= 3, "{enc:?} {n}");
                    if k == chunks.len() {
                        assert_eq!(s, expected());
                    }
                } else {
                    assert_eq!(r, Err(SniffError::Truncated), "{enc:?} prefix {n}");
                }
            }
        }
        // A deflate stream cut anywhere before its end is truncated.
        let z = deflate(&sample(Enc::Le, false, true).concat());
        for n in 0..z.len() {
            let (_, r) = sniff(Encoding::DeflatedExplicitVrLittle, &[&z[..n]]);
            assert_eq!(r, Err(SniffError::Truncated), "deflated prefix {n}");
        }
        // Cut once the sniffer is done: the summary is complete.
        let data = sample(Enc::Le, true, false).concat();
        let cut = data.len() - 30;
        let (done, r) = sniff(Encoding::ExplicitVrLittle, &[&data[..cut]]);
        assert!(done);
        assert_eq!(r, Ok(expected()));
    }

    #[test]
    fn done_makes_feed_a_no_op() {
        let data = sample(Enc::Le, true, false).concat();
        let mut s = Sniffer::new(Encoding::ExplicitVrLittle);
        s.feed(&data).unwrap();
        assert!(s.is_done());
        let pos = s.parser.pos;
        // Garbage after the point where the sniffer stopped is never looked at.
        s.feed(&[0xFF; 100_000]).unwrap();
        s.feed(b"ZZZZZZZZ").unwrap();
        assert_eq!(s.parser.pos, pos);
        assert_eq!(s.finish(), Ok(expected()));
        // Done as soon as the 4 tag bytes of (0020,0010) are seen.
        let chunks = sample(Enc::Be, true, false);
        let n: usize = chunks[..chunks.len() - 2].iter().map(Vec::len).sum();
        let data = chunks.concat();
        let (done, _) = sniff(Encoding::ExplicitVrBig, &[&data[..n + 3]]);
        assert!(!done);
        let (done, r) = sniff(Encoding::ExplicitVrBig, &[&data[..n + 4]]);
        assert!(done);
        assert_eq!(r, Ok(expected()));
    }

    #[test]
    fn values_are_trimmed_and_empty_is_none() {
        for enc in ALL {
            let b = || B::new(enc);
            let data = [
                b().el(0x0008_0016, b"UI", b"1.2\0\0").out,
                b().el(0x0008_0018, b"UI", b" 1.2 ").out,
                b().el(0x0008_0020, b"DA", b"").out,
                b().el(0x0008_0060, b"CS", b"    ").out,
                b().el(0x0008_1030, b"LO", b"  a  b \0").out,
                b().el(0x0010_0010, b"PN", b"\xC3\xA9l\xE9").out,
                b().el(0x0010_0020, b"LO", b"\0\0").out,
                b().el(0x0020_000D, b"UI", b"1.2.3\0").out,
                b().el(0x0020_000D, b"UI", b"1.2.4\0").out,
            ]
            .concat();
            let (_, r) = sniff(encoding(enc), &[&data]);
            assert_eq!(
                r,
                Ok(DatasetSummary {
                    sop_class_uid: Some("1.2".into()),
                    sop_instance_uid: Some(" 1.2".into()),
                    study_description: Some("a  b".into()),
                    // Not valid UTF-8 and no character set declared: ISO 8859-1.
                    patient_name: Some("\u{c3}\u{a9}l\u{e9}".into()),
                    study_instance_uid: Some("1.2.4".into()),
                    ..DatasetSummary::default()
                }),
                "{enc:?}"
            );
        }
    }

    #[test]
    fn value_length_limit() {
        for enc in ALL {
            let b = || B::new(enc);
            let ok = b().el(0x0008_1030, b"LO", &[b'a'; 1024]).out;
            let (_, r) = sniff(encoding(enc), &[&ok]);
            assert_eq!(r.unwrap().study_description.unwrap().len(), 1024);
            let mut s = Sniffer::new(encoding(enc));
            for (i, byte) in ok.chunks(1).enumerate() {
                s.feed(byte).unwrap();
                assert!(s.parser.value.capacity() <= MAX_VALUE_LEN, "{i}");
            }
            assert_eq!(s.finish().unwrap().study_description.unwrap().len(), 1024);
            let long = b().el(0x0008_1030, b"LO", &[b'a'; 1026]).out;
            let (_, r) = sniff(encoding(enc), &[&long]);
            assert_eq!(
                r,
                Err(SniffError::ValueTooLong {
                    tag: 0x0008_1030,
                    length: 1026
                })
            );
            // Unwanted values of any size are skipped, wanted ones nested too.
            let data = [
                b().long_header(0x0008_0001, b"OB", 0xFFFF_FFF0).out,
                vec![0; 100],
            ]
            .concat();
            let (_, r) = sniff(encoding(enc), &[&data]);
            assert_eq!(r, Err(SniffError::Truncated));
            let nested = b()
                .sq(0x0008_1110)
                .item()
                .el(0x0008_1030, b"UT", &[b'a'; 5000])
                .item_end()
                .seq_end()
                .out;
            let (_, r) = sniff(encoding(enc), &[&nested]);
            assert_eq!(r, Ok(DatasetSummary::default()));
        }
    }

    fn nested(enc: Enc, depth: usize) -> Vec<u8> {
        let mut b = B::new(enc);
        for _ in 0..depth {
            b = b.sq(0x0008_1110).item();
        }
        b = b.text(0x0008_0018, b"UI", "9.9");
        for _ in 0..depth {
            b = b.item_end().seq_end();
        }
        b.text(0x0008_0018, b"UI", "1.2").out
    }

    #[test]
    fn nesting_depth_is_bounded() {
        for enc in ALL {
            let (_, r) = sniff(encoding(enc), &[&nested(enc, MAX_DEPTH)]);
            assert_eq!(r.unwrap().sop_instance_uid.as_deref(), Some("1.2"));
            let (_, r) = sniff(encoding(enc), &[&nested(enc, MAX_DEPTH + 1)]);
            assert!(matches!(r, Err(SniffError::TooDeep { .. })), "{r:?}");
            // Deeper nesting inside a skipped defined-length sequence costs nothing.
            let inner = nested(enc, MAX_DEPTH + 10);
            let data = B::new(enc)
                .sq_def(0x0008_1111, &B::new(enc).item_def(&inner).out)
                .text(0x0008_0018, b"UI", "1.2")
                .out;
            let (_, r) = sniff(encoding(enc), &[&data]);
            assert_eq!(r.unwrap().sop_instance_uid.as_deref(), Some("1.2"));
        }
    }

    #[test]
    fn malformed_input_is_an_error() {
        let le = || B::new(Enc::Le);
        let cases: Vec<(Vec<u8>, SniffError)> = vec![
            (
                le().tag(0x0008_0016).raw(b"ZZ\x02\x00ab").out,
                SniffError::UnknownVr {
                    offset: 0,
                    vr: *b"ZZ",
                },
            ),
            (
                le().text(0x0008_0005, b"CS", "X")
                    .tag(0x0008_0016)
                    .raw(b"ui\x02\x00ab")
                    .out,
                SniffError::UnknownVr {
                    offset: 10,
                    vr: *b"ui",
                },
            ),
            (
                le().sq(0x0008_1110).text(0x0008_0018, b"UI", "1").out,
                SniffError::Malformed {
                    offset: 12,
                    reason: "expected an item in a sequence",
                },
            ),
            (
                le().sq(0x0008_1110).item().item().out,
                SniffError::Malformed {
                    offset: 20,
                    reason: "unexpected item or delimiter tag",
                },
            ),
            (
                le().sq(0x0008_1110).item().seq_end().out,
                SniffError::Malformed {
                    offset: 20,
                    reason: "unexpected item or delimiter tag",
                },
            ),
            (
                le().sq(0x0008_1110).item_end().out,
                SniffError::Malformed {
                    offset: 12,
                    reason: "expected an item in a sequence",
                },
            ),
            (
                le().long_header(0x0008_1030, b"UT", UNDEFINED).out,
                SniffError::Malformed {
                    offset: 0,
                    reason: "undefined length on a non-sequence VR",
                },
            ),
        ];
        for (data, want) in cases {
            let (_, r) = sniff(Encoding::ExplicitVrLittle, &[&data]);
            assert_eq!(r, Err(want.clone()));
            assert!(!want.to_string().is_empty());
            // One byte at a time gives the same error.
            let bytes: Vec<&[u8]> = data.chunks(1).collect();
            assert_eq!(sniff(Encoding::ExplicitVrLittle, &bytes).1, Err(want));
        }
        let (_, r) = sniff(Encoding::DeflatedExplicitVrLittle, &[b"\xFF\xFF\xFF\xFF"]);
        assert!(matches!(r, Err(SniffError::Inflate(_))), "{r:?}");
    }

    #[test]
    fn errors_are_sticky() {
        let good = sample(Enc::Le, true, false).concat();
        let mut s = Sniffer::new(Encoding::ExplicitVrLittle);
        let e = s.feed(b"\x08\x00\x16\x00ZZ").unwrap_err();
        assert_eq!(s.feed(&good), Err(e.clone()));
        assert!(!s.is_done());
        assert_eq!(s.finish(), Err(e));
    }

    #[test]
    fn empty_data_set() {
        for e in [
            Encoding::ImplicitVrLittle,
            Encoding::ExplicitVrLittle,
            Encoding::ExplicitVrBig,
        ] {
            assert_eq!(sniff(e, &[]), (false, Ok(DatasetSummary::default())));
        }
        let z = deflate(&[]);
        assert_eq!(
            sniff(Encoding::DeflatedExplicitVrLittle, &[&z]),
            (false, Ok(DatasetSummary::default()))
        );
        assert_eq!(
            sniff(Encoding::DeflatedExplicitVrLittle, &[]).1,
            Err(SniffError::Truncated)
        );
    }

    #[test]
    fn deflate_bomb_is_streamed_with_bounded_memory() {
        const ZEROS: u32 = 100 << 20;
        let le = || B::new(Enc::Le);
        let head = le()
            .text(0x0008_0016, b"UI", "1.2")
            .long_header(0x0009_1001, b"OB", ZEROS)
            .out;
        let tail = le()
            .text(0x0008_0018, b"UI", "1.2.3")
            .text(0x0020_000D, b"UI", "1.2.3.4")
            .text(0x0020_000E, b"UI", "1.2.3.4.5")
            .text(0x0020_0010, b"SH", "1")
            .out;
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&head).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..(ZEROS >> 20) {
            e.write_all(&zeros).unwrap();
        }
        e.write_all(&tail).unwrap();
        let z = e.finish().unwrap();
        assert!(z.len() < 1 << 20, "{}", z.len());
        let mut s = Sniffer::new(Encoding::DeflatedExplicitVrLittle);
        for part in z.chunks(16 << 10) {
            s.feed(part).unwrap();
            assert!(s.parser.value.capacity() <= MAX_VALUE_LEN);
            assert!(s.parser.stack.capacity() <= 2 * MAX_DEPTH);
        }
        assert!(s.is_done());
        assert!(s.parser.pos > u64::from(ZEROS));
        let r = s.finish().unwrap();
        assert_eq!(r.series_instance_uid.as_deref(), Some("1.2.3.4.5"));
    }

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Feeds `data` in random-sized parts; must never panic.
    fn feed_randomly(rng: &mut Rng, e: Encoding, data: &[u8]) {
        let mut s = Sniffer::new(e);
        let mut rest = data;
        while !rest.is_empty() {
            let (a, b) = rest.split_at(rng.below(rest.len().min(64)) + 1);
            let _ = s.feed(a);
            rest = b;
        }
        let _ = s.finish();
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let encodings = [
            Encoding::ImplicitVrLittle,
            Encoding::ExplicitVrLittle,
            Encoding::ExplicitVrBig,
            Encoding::DeflatedExplicitVrLittle,
        ];
        for _ in 0..300 {
            let len = rng.below(3000);
            // Mostly small bytes so that lengths are small and headers chain.
            let data: Vec<u8> = (0..len)
                .map(|_| match rng.below(4) {
                    0 => 0,
                    1 => 0xFF,
                    2 => rng.below(16) as u8,
                    _ => rng.next() as u8,
                })
                .collect();
            for e in encodings {
                feed_randomly(&mut rng, e, &data);
            }
        }
        // Every single-byte corruption of valid data sets.
        for enc in ALL {
            let data = sample(enc, true, false).concat();
            for i in 0..data.len() {
                for v in [0x00, 0xFF, 0x01, 0xFE] {
                    let mut d = data.clone();
                    d[i] = v;
                    let _ = sniff(encoding(enc), &[&d]);
                }
            }
        }
        let z = deflate(&sample(Enc::Le, true, true).concat());
        for i in 0..z.len() {
            let mut d = z.clone();
            d[i] ^= 0x55;
            let _ = sniff(Encoding::DeflatedExplicitVrLittle, &[&d]);
        }
    }
}
