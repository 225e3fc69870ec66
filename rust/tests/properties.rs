//! Property-based tests (proptest) of everything that reads bytes from the network: PDU
//! round trips and parsers, DIMSE command sets, the data set header sniffer, and the
//! path-safety of the file naming. Public API only.
//!
//! The case count is proptest's default (256, or `PROPTEST_CASES` from the environment);
//! the heavier properties run a fraction of it so that the file stays fast in debug builds.
//! A longer coverage-guided run lives in `fuzz/` (see fuzz/README.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};

use _core::association::{self, AcceptPolicy, Negotiation};
use _core::dimse::{self, command_field, Command};
use _core::naming::{self, Naming};
use _core::pdu::{
    self, AssociateAc, AssociateRq, PresentationContextAc, PresentationContextRq, RoleSelection,
    UserInformation,
};
use _core::sniff::{DatasetSummary, Encoding, SniffError, Sniffer, MAX_VALUE_LEN};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

// ---------------------------------------------------------------------------------------
// Configuration and a per-thread allocation counter (for "memory stays bounded")
// ---------------------------------------------------------------------------------------

/// proptest's default configuration (which honours `PROPTEST_CASES`) with the case count
/// divided by `divisor`, at least 16.
fn cases(divisor: u32) -> ProptestConfig {
    let base = ProptestConfig::default();
    ProptestConfig {
        cases: (base.cases / divisor).max(16),
        ..base
    }
}

/// Counts the bytes allocated and freed by the current thread, so that a test can bound
/// the peak memory of the code it calls (other test threads do not disturb the count).
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().wrapping_add(delta);
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now);
            }
        });
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters are
// const-initialised thread locals without destructors, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the peak number of bytes it held allocated at once
/// on this thread (beyond what was live when it started).
fn peak_memory<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, usize::try_from(peak - start).unwrap_or(0))
}

/// Cuts `len` bytes at the given points (deduplicated, sorted) into chunk boundaries.
fn split_points(len: usize, cuts: &[Index]) -> Vec<usize> {
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(len + 1)).collect();
    points.push(0);
    points.push(len);
    points.sort_unstable();
    points.dedup();
    points
}

fn chunks<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    split_points(bytes.len(), cuts)
        .windows(2)
        .map(|w| &bytes[w[0]..w[1]])
        .collect()
}

// ---------------------------------------------------------------------------------------
// Strategies: PDUs
// ---------------------------------------------------------------------------------------

/// 1-16 printable ASCII characters without the backslash (PS3.5 VR AE).
fn arb_ae() -> impl Strategy<Value = String> {
    "[ -\\[\\]-~]{1,16}"
}

/// A UID-like string: digits and dots, 1-64 characters (not necessarily valid).
fn arb_uid() -> impl Strategy<Value = String> {
    "[0-9.]{1,64}"
}

/// A valid UID: digit components joined by dots, at most 62 characters.
fn arb_valid_uid() -> impl Strategy<Value = String> {
    "[0-9]{1,6}(\\.[0-9]{1,6}){0,8}"
}

fn arb_role() -> impl Strategy<Value = RoleSelection> {
    (arb_uid(), any::<bool>(), any::<bool>()).prop_map(|(sop_class_uid, scu_role, scp_role)| {
        RoleSelection {
            sop_class_uid,
            scu_role,
            scp_role,
        }
    })
}

fn arb_user_info() -> impl Strategy<Value = UserInformation> {
    (
        proptest::option::of(any::<u32>()),
        proptest::option::of(arb_uid()),
        proptest::option::of(arb_ae()),
        proptest::option::of(any::<(u16, u16)>()),
        vec(arb_role(), 0..4),
        vec((arb_uid(), vec(any::<u8>(), 0..16)), 0..3),
        proptest::option::of((any::<u8>(), vec(any::<u8>(), 0..32))),
    )
        .prop_map(
            |(max, class, version, window, roles, extended, identity)| UserInformation {
                max_pdu_length: max,
                implementation_class_uid: class,
                implementation_version_name: version,
                async_ops_window: window,
                role_selections: roles,
                extended_negotiations: extended,
                user_identity: identity,
            },
        )
}

fn arb_odd_id() -> impl Strategy<Value = u8> {
    (0u8..128).prop_map(|i| i * 2 + 1)
}

fn arb_pc_rq() -> impl Strategy<Value = PresentationContextRq> {
    (arb_odd_id(), arb_uid(), vec(arb_uid(), 0..4)).prop_map(
        |(id, abstract_syntax, transfer_syntaxes)| PresentationContextRq {
            id,
            abstract_syntax,
            transfer_syntaxes,
        },
    )
}

/// An A-ASSOCIATE-RQ with 1-128 presentation contexts.
fn arb_associate_rq() -> impl Strategy<Value = AssociateRq> {
    arb_associate_rq_with(1..128)
}

fn arb_associate_rq_with(contexts: std::ops::Range<usize>) -> impl Strategy<Value = AssociateRq> {
    (
        any::<u16>(),
        arb_ae(),
        arb_ae(),
        arb_uid(),
        vec(arb_pc_rq(), contexts),
        arb_user_info(),
    )
        .prop_map(
            |(version, called_ae, calling_ae, application_context, pcs, user_info)| AssociateRq {
                protocol_version: version | 1,
                called_ae,
                calling_ae,
                application_context,
                presentation_contexts: pcs,
                user_info,
            },
        )
}

fn arb_associate_ac() -> impl Strategy<Value = AssociateAc> {
    (
        (arb_ae(), arb_ae(), arb_uid()),
        vec(
            (
                arb_odd_id(),
                0u8..5,
                prop_oneof![Just(String::new()), arb_uid()],
            ),
            1..128,
        ),
        any::<u32>(),
        arb_uid(),
        prop_oneof![Just(String::new()), arb_ae()],
        proptest::option::of(any::<(u16, u16)>()),
        vec(arb_role(), 0..4),
    )
        .prop_map(
            |(
                (called_ae, calling_ae, application_context),
                pcs,
                max,
                class,
                version,
                window,
                roles,
            )| {
                AssociateAc {
                    called_ae,
                    calling_ae,
                    application_context,
                    presentation_contexts: pcs
                        .into_iter()
                        .map(|(id, result, transfer_syntax)| PresentationContextAc {
                            id,
                            result,
                            transfer_syntax,
                        })
                        .collect(),
                    max_pdu_length: max,
                    implementation_class_uid: class,
                    implementation_version_name: version,
                    async_ops_window: window,
                    role_selections: roles,
                }
            },
        )
}

/// The documented trimming of the parser: AE titles lose leading and trailing spaces and
/// NULs; UIDs and the implementation version name lose trailing ones.
fn trim_ae(s: &str) -> String {
    s.trim_matches([' ', '\0']).to_owned()
}

fn trim_uid(s: &str) -> String {
    s.trim_end_matches([' ', '\0']).to_owned()
}

fn expected_rq(rq: &AssociateRq) -> AssociateRq {
    let mut e = rq.clone();
    e.called_ae = trim_ae(&rq.called_ae);
    e.calling_ae = trim_ae(&rq.calling_ae);
    e.user_info.implementation_version_name = rq
        .user_info
        .implementation_version_name
        .as_deref()
        .map(trim_uid);
    e
}

fn expected_ac(ac: &AssociateAc) -> AssociateAc {
    let mut e = ac.clone();
    e.called_ae = trim_ae(&ac.called_ae);
    e.calling_ae = trim_ae(&ac.calling_ae);
    e.implementation_version_name = trim_uid(&ac.implementation_version_name);
    e
}

/// Splits a whole PDU into its checked header and body.
fn split_pdu(bytes: &[u8]) -> (u8, &[u8]) {
    let header: [u8; 6] = bytes[..6].try_into().unwrap();
    let (kind, len) = pdu::parse_pdu_header(&header).unwrap();
    assert_eq!(len as usize, bytes.len() - 6, "PDU length field");
    (kind, &bytes[6..])
}

/// True if no string of a parsed A-ASSOCIATE-RQ went through a lossy UTF-8 replacement
/// (which can make a re-encoded field longer than its frame allows).
fn rq_is_lossless(rq: &AssociateRq) -> bool {
    let ui = &rq.user_info;
    let mut all: Vec<&str> = vec![&rq.called_ae, &rq.calling_ae, &rq.application_context];
    for pc in &rq.presentation_contexts {
        all.push(&pc.abstract_syntax);
        all.extend(pc.transfer_syntaxes.iter().map(String::as_str));
    }
    all.extend(ui.implementation_class_uid.as_deref());
    all.extend(ui.implementation_version_name.as_deref());
    all.extend(ui.role_selections.iter().map(|r| r.sop_class_uid.as_str()));
    all.extend(ui.extended_negotiations.iter().map(|(u, _)| u.as_str()));
    all.iter().all(|s| !s.contains('\u{FFFD}'))
}

fn ac_is_lossless(ac: &AssociateAc) -> bool {
    let mut all: Vec<&str> = vec![
        &ac.called_ae,
        &ac.calling_ae,
        &ac.application_context,
        &ac.implementation_class_uid,
        &ac.implementation_version_name,
    ];
    all.extend(
        ac.presentation_contexts
            .iter()
            .map(|p| p.transfer_syntax.as_str()),
    );
    all.extend(ac.role_selections.iter().map(|r| r.sop_class_uid.as_str()));
    all.iter().all(|s| !s.contains('\u{FFFD}'))
}

/// Applies byte edits and an optional truncation to a valid encoding.
fn mutate(mut bytes: Vec<u8>, edits: &[(Index, u8)], cut: Option<Index>) -> Vec<u8> {
    if !bytes.is_empty() {
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = *value;
        }
    }
    if let Some(cut) = cut {
        bytes.truncate(cut.index(bytes.len() + 1));
    }
    bytes
}

fn fixed_policy() -> AcceptPolicy {
    AcceptPolicy {
        ae_title: "STORESCP".into(),
        called_ae_check: false,
        allowed_calling: vec![],
        abstract_syntaxes: [
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.840.10008.5.1.4.1.1.4",
            "1.2",
        ]
        .map(String::from)
        .into(),
        transfer_syntaxes: ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2"]
            .map(String::from)
            .into(),
        max_pdu_length: 16384,
    }
}

// ---------------------------------------------------------------------------------------
// PDU properties
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(2))]

    #[test]
    fn associate_rq_round_trip(rq in arb_associate_rq()) {
        let bytes = pdu::encode_associate_rq(&rq);
        let (kind, body) = split_pdu(&bytes);
        prop_assert_eq!(kind, pdu::pdu_type::ASSOCIATE_RQ);
        let parsed = pdu::parse_associate_rq(body).unwrap();
        prop_assert_eq!(parsed, expected_rq(&rq));
    }

    #[test]
    fn associate_ac_round_trip(ac in arb_associate_ac()) {
        let bytes = pdu::encode_associate_ac(&ac);
        let (kind, body) = split_pdu(&bytes);
        prop_assert_eq!(kind, pdu::pdu_type::ASSOCIATE_AC);
        let parsed = pdu::parse_associate_ac(body).unwrap();
        prop_assert_eq!(parsed, expected_ac(&ac));
    }

    /// Negotiation answers every proposed context once, in order, accepts only what the
    /// policy allows, and its A-ASSOCIATE-AC survives the wire.
    #[test]
    fn negotiation_answers_every_context(rq in arb_associate_rq_with(1..24), verification in any::<bool>()) {
        let mut rq = expected_rq(&rq);
        rq.application_context = pdu::APPLICATION_CONTEXT_NAME.into();
        if verification {
            rq.presentation_contexts[0].abstract_syntax = association::VERIFICATION_SOP_CLASS.into();
        }
        let policy = fixed_policy();
        let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let Negotiation::Accept { ac, contexts } = association::negotiate(&rq, &policy, peer) else {
            return Err(TestCaseError::fail("a default policy must accept"));
        };
        prop_assert_eq!(ac.presentation_contexts.len(), rq.presentation_contexts.len());
        let mut accepted = 0;
        for (pc, res) in rq.presentation_contexts.iter().zip(&ac.presentation_contexts) {
            prop_assert_eq!(pc.id, res.id);
            if res.result == pdu::presentation_result::ACCEPTANCE {
                accepted += 1;
                prop_assert!(policy.transfer_syntaxes.contains(&res.transfer_syntax));
                prop_assert!(pc.transfer_syntaxes.contains(&res.transfer_syntax));
            }
        }
        prop_assert_eq!(accepted, contexts.len());
        if verification
            && rq.presentation_contexts[0]
                .transfer_syntaxes
                .iter()
                .any(|t| policy.transfer_syntaxes.contains(t))
        {
            prop_assert_eq!(ac.presentation_contexts[0].result, 0);
        }
        let bytes = pdu::encode_associate_ac(&ac);
        let (_, body) = split_pdu(&bytes);
        prop_assert_eq!(pdu::parse_associate_ac(body).unwrap(), ac);
    }

    /// A message cut into P-DATA-TF PDUs for any maximum length >= 7 (or 0, unlimited)
    /// comes back whole through `pdvs`, no PDU body above the limit, last flag only on the
    /// final fragment.
    #[test]
    fn message_fragments_reassemble(
        message in vec(any::<u8>(), 0..6000),
        max in prop_oneof![Just(0u32), 7u32..64, 64u32..=20000],
        context_id in any::<u8>(),
        is_command in any::<bool>(),
    ) {
        let mut out = Vec::new();
        pdu::encode_message_fragments(&mut out, context_id, is_command, &message, max);
        let mut rest = out.as_slice();
        let mut got = Vec::new();
        let mut flags = Vec::new();
        while !rest.is_empty() {
            let header: [u8; 6] = rest[..6].try_into().unwrap();
            let (kind, len) = pdu::parse_pdu_header(&header).unwrap();
            prop_assert_eq!(kind, pdu::pdu_type::P_DATA_TF);
            if max != 0 {
                prop_assert!(len <= max, "PDU body {} above the limit {}", len, max);
            }
            let body = &rest[6..6 + len as usize];
            rest = &rest[6 + len as usize..];
            for pdv in pdu::pdvs(body) {
                let pdv = pdv.unwrap();
                prop_assert_eq!(pdv.context_id, context_id);
                prop_assert_eq!(pdv.is_command, is_command);
                flags.push(pdv.is_last);
                got.extend_from_slice(pdv.data);
            }
        }
        prop_assert_eq!(got, message);
        let last = flags.pop();
        prop_assert_eq!(last, Some(true));
        prop_assert!(flags.iter().all(|l| !l), "a fragment before the last is flagged last");
    }
}

/// An A-ASSOCIATE-RQ (65673 bytes, well under the server's 1 MiB limit) whose User
/// Information Item is filled with 910 SCP/SCU Role Selection sub-items (64-character SOP
/// class UID each). With the AC's own Maximum Length, Implementation Class UID and Version
/// Name sub-items the User Information Item would no longer fit its 16-bit length if they were all echoed: `negotiate` answers
/// only the classes of accepted contexts, so the A-ASSOCIATE-AC stays well formed.
#[test]
fn associate_ac_with_many_role_selections_stays_well_formed() {
    let uid = format!("1.{}", "2".repeat(62));
    let rq = AssociateRq {
        protocol_version: 1,
        called_ae: "STORESCP".into(),
        calling_ae: "MODALITY".into(),
        application_context: pdu::APPLICATION_CONTEXT_NAME.into(),
        presentation_contexts: vec![PresentationContextRq {
            id: 1,
            abstract_syntax: association::VERIFICATION_SOP_CLASS.into(),
            transfer_syntaxes: vec!["1.2.840.10008.1.2".into()],
        }],
        user_info: UserInformation {
            role_selections: vec![
                RoleSelection {
                    sop_class_uid: uid,
                    scu_role: true,
                    scp_role: true,
                };
                910
            ],
            ..UserInformation::default()
        },
    };
    let bytes = pdu::encode_associate_rq(&rq);
    let (_, body) = split_pdu(&bytes);
    let parsed = pdu::parse_associate_rq(body).unwrap();
    assert_eq!(parsed, rq);
    let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let Negotiation::Accept { ac, .. } = association::negotiate(&parsed, &fixed_policy(), peer)
    else {
        panic!("rejected");
    };
    let out = pdu::encode_associate_ac(&ac);
    let (_, body) = split_pdu(&out);
    assert!(
        pdu::parse_associate_ac(body).is_ok(),
        "{:?}",
        pdu::parse_associate_ac(body)
    );
}

proptest! {
    #![proptest_config(cases(1))]

    #[test]
    fn pdu_header_accepts_only_defined_types(header in any::<[u8; 6]>()) {
        let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
        match pdu::parse_pdu_header(&header) {
            Ok((kind, length)) => {
                prop_assert_eq!(kind, header[0]);
                prop_assert_eq!(length, len);
                prop_assert!((1..=7).contains(&kind));
                if ![1, 2, 4].contains(&kind) {
                    prop_assert_eq!(length, 4);
                }
            }
            Err(e) => prop_assert!(!(1..=7).contains(&header[0]) || len != 4, "{e}"),
        }
    }

    #[test]
    fn parsers_never_panic_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..1024)) {
        let _ = pdu::parse_associate_rq(&bytes);
        let _ = pdu::parse_associate_ac(&bytes);
        let _ = pdu::parse_associate_rj(&bytes);
        prop_assert_eq!(pdu::parse_abort(&bytes).is_ok(), bytes.len() == 4);
        let _ = dimse::parse_command(&bytes);
        let mut consumed = 0usize;
        let mut items = 0usize;
        for pdv in pdu::pdvs(&bytes) {
            items += 1;
            if let Ok(pdv) = pdv {
                consumed += 6 + pdv.data.len();
            }
        }
        prop_assert!(consumed <= bytes.len());
        prop_assert!(items <= bytes.len() / 6 + 1);
    }

    /// Valid encodings with a few bytes overwritten and possibly cut: never a panic, and
    /// whatever parses re-encodes to the same value.
    #[test]
    fn mutated_associate_pdus_parse_or_fail_cleanly(
        rq in arb_associate_rq_with(1..6),
        edits in vec((any::<Index>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<Index>()),
    ) {
        let encoded = pdu::encode_associate_rq(&rq);
        let body = mutate(encoded[6..].to_vec(), &edits, cut);
        if let Ok(parsed) = pdu::parse_associate_rq(&body) {
            if rq_is_lossless(&parsed) {
                let again = pdu::encode_associate_rq(&parsed);
                prop_assert_eq!(pdu::parse_associate_rq(&again[6..]).unwrap(), parsed);
            }
        }
        if let Ok(parsed) = pdu::parse_associate_ac(&body) {
            if ac_is_lossless(&parsed) {
                let again = pdu::encode_associate_ac(&parsed);
                prop_assert_eq!(pdu::parse_associate_ac(&again[6..]).unwrap(), parsed);
            }
        }
        // A P-DATA-TF reading of the same bytes must terminate without a panic.
        prop_assert!(pdu::pdvs(&body).count() <= body.len() / 6 + 1);
    }
}

// ---------------------------------------------------------------------------------------
// DIMSE properties
// ---------------------------------------------------------------------------------------

/// The (tag, value) elements of a command set, checking every framing on the way.
fn command_elements(bytes: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let group = u16::from_le_bytes([rest[0], rest[1]]);
        let element = u16::from_le_bytes([rest[2], rest[3]]);
        let len = u32::from_le_bytes(rest[4..8].try_into().unwrap()) as usize;
        out.push((
            (u32::from(group) << 16) | u32::from(element),
            rest[8..8 + len].to_vec(),
        ));
        rest = &rest[8 + len..];
    }
    out
}

/// What `encode_c_store_rsp` documents for an Error Comment: the first 64 characters,
/// anything but printable ASCII and the backslash replaced with `?`, space padded to even.
fn cleaned_comment(comment: &str) -> Vec<u8> {
    let mut v: Vec<u8> = comment
        .chars()
        .take(dimse::MAX_ERROR_COMMENT)
        .map(|c| match c {
            ' '..='~' if c != '\\' => c as u8,
            _ => b'?',
        })
        .collect();
    if v.len() % 2 == 1 {
        v.push(b' ');
    }
    v
}

/// Checks the Command Group Length and that every value has even length.
fn check_command_framing(bytes: &[u8]) -> Result<(), TestCaseError> {
    let elements = command_elements(bytes);
    prop_assert_eq!(elements[0].0, 0);
    let group_len = u32::from_le_bytes(elements[0].1.clone().try_into().unwrap());
    prop_assert_eq!(group_len as usize, bytes.len() - 12);
    for (tag, value) in &elements {
        prop_assert!(value.len() % 2 == 0, "odd length for {:08X}", tag);
    }
    let tags: Vec<u32> = elements.iter().map(|(t, _)| *t).collect();
    let mut sorted = tags.clone();
    sorted.sort_unstable();
    prop_assert_eq!(tags, sorted, "elements not in ascending order");
    Ok(())
}

/// One element of a command set for the model-based parser test.
#[derive(Debug, Clone)]
struct RawElement {
    tag: u32,
    value: Vec<u8>,
}

fn arb_command_element() -> impl Strategy<Value = RawElement> {
    let us_tag = prop::sample::select(vec![
        0x0000_0100u32,
        0x0000_0110,
        0x0000_0120,
        0x0000_0700,
        0x0000_0800,
        0x0000_0900,
        0x0000_1031,
    ]);
    let text_tag = prop::sample::select(vec![0x0000_0002u32, 0x0000_1000, 0x0000_1030]);
    prop_oneof![
        (us_tag, any::<u16>()).prop_map(|(tag, v)| RawElement {
            tag,
            value: v.to_le_bytes().to_vec()
        }),
        (text_tag, "[ 0-9.A-Z\\x00]{0,20}").prop_map(|(tag, s)| RawElement {
            tag,
            value: s.into_bytes()
        }),
        // Unused elements of group 0 and of other groups are skipped.
        (any::<u32>(), vec(any::<u8>(), 0..12)).prop_map(|(tag, value)| RawElement {
            tag: match tag & 0xFFFF {
                0x0002 | 0x0100 | 0x0110 | 0x0120 | 0x0700 | 0x0800 | 0x0900 | 0x1000 | 0x1030
                | 0x1031 => tag | 0x0001_0000,
                _ => tag,
            },
            value
        }),
    ]
}

/// The parser's documented behaviour, written independently: last element wins, missing
/// Message ID is 0, missing Priority 0, text trimmed and empty read as absent.
fn model_command(elements: &[RawElement]) -> Option<Command> {
    let mut c = Command::default();
    let (mut field, mut dtype) = (false, false);
    let text = |v: &[u8], lead: bool| {
        let s = String::from_utf8_lossy(v);
        let s = s.trim_end_matches(['\0', ' ']);
        let s = if lead { s.trim_start_matches(' ') } else { s };
        (!s.is_empty()).then(|| s.to_owned())
    };
    for e in elements {
        let us = || u16::from_le_bytes([e.value[0], e.value[1]]);
        match e.tag {
            0x0000_0100 => {
                c.command_field = us();
                field = true;
            }
            0x0000_0800 => {
                c.data_set_type = us();
                dtype = true;
            }
            0x0000_0110 => c.message_id = us(),
            0x0000_0120 => c.message_id_being_responded_to = Some(us()),
            0x0000_0700 => c.priority = us(),
            0x0000_0900 => c.status = Some(us()),
            0x0000_1031 => c.move_originator_message_id = Some(us()),
            0x0000_0002 => c.affected_sop_class_uid = text(&e.value, false),
            0x0000_1000 => c.affected_sop_instance_uid = text(&e.value, false),
            0x0000_1030 => c.move_originator_ae = text(&e.value, true),
            _ => {}
        }
    }
    (field && dtype).then_some(c)
}

proptest! {
    #![proptest_config(cases(1))]

    #[test]
    fn c_store_rq_round_trip(
        message_id in any::<u16>(),
        class in arb_uid(),
        instance in arb_uid(),
        priority in 0u16..3,
    ) {
        let bytes = dimse::encode_c_store_rq(message_id, &class, &instance, priority);
        check_command_framing(&bytes)?;
        let cmd = dimse::parse_command(&bytes).unwrap();
        prop_assert_eq!(cmd.command_field, command_field::C_STORE_RQ);
        prop_assert_eq!(cmd.message_id, message_id);
        prop_assert_eq!(cmd.priority, priority);
        prop_assert!(cmd.has_data_set());
        prop_assert_eq!(cmd.affected_sop_class_uid, Some(class));
        prop_assert_eq!(cmd.affected_sop_instance_uid, Some(instance));
        prop_assert_eq!(cmd.status, None);
    }

    #[test]
    fn c_store_rsp_carries_status_and_a_clean_comment(
        message_id in any::<u16>(),
        class in arb_uid(),
        instance in arb_uid(),
        status in any::<u16>(),
        comment in proptest::option::of(prop_oneof![
            any::<String>(),
            "[ -~]{0,100}",
            "\\PC{60,70}",
        ]),
    ) {
        let bytes =
            dimse::encode_c_store_rsp(message_id, &class, &instance, status, comment.as_deref());
        check_command_framing(&bytes)?;
        let cmd = dimse::parse_command(&bytes).unwrap();
        prop_assert_eq!(cmd.command_field, command_field::C_STORE_RSP);
        prop_assert_eq!(cmd.message_id_being_responded_to, Some(message_id));
        prop_assert_eq!(cmd.status, Some(status));
        prop_assert!(!cmd.has_data_set());
        prop_assert_eq!(cmd.affected_sop_class_uid, Some(class));
        prop_assert_eq!(cmd.affected_sop_instance_uid, Some(instance));
        let found: Vec<Vec<u8>> = command_elements(&bytes)
            .into_iter()
            .filter(|(t, _)| *t == 0x0000_0902)
            .map(|(_, v)| v)
            .collect();
        match &comment {
            None => prop_assert!(found.is_empty()),
            Some(c) => {
                prop_assert_eq!(found.len(), 1);
                let value = &found[0];
                prop_assert!(value.len() <= dimse::MAX_ERROR_COMMENT);
                prop_assert!(value.iter().all(|b| (b' '..=b'~').contains(b) && *b != b'\\'));
                prop_assert_eq!(value, &cleaned_comment(c));
            }
        }
    }

    #[test]
    fn failure_rsp_answers_the_request(
        field in any::<u16>(),
        message_id in any::<u16>(),
        class in proptest::option::of(arb_uid()),
        instance in proptest::option::of(arb_uid()),
        status in any::<u16>(),
        comment in any::<String>(),
    ) {
        let request = Command {
            command_field: field,
            message_id,
            affected_sop_class_uid: class.clone(),
            affected_sop_instance_uid: instance.clone(),
            ..Command::default()
        };
        let bytes = dimse::encode_failure_rsp(&request, status, &comment);
        check_command_framing(&bytes)?;
        let cmd = dimse::parse_command(&bytes).unwrap();
        prop_assert_eq!(cmd.command_field, field | 0x8000);
        prop_assert_eq!(cmd.message_id_being_responded_to, Some(message_id));
        prop_assert_eq!(cmd.status, Some(status));
        prop_assert!(!cmd.has_data_set());
        prop_assert_eq!(cmd.affected_sop_class_uid, class);
        prop_assert_eq!(cmd.affected_sop_instance_uid, instance);
    }

    /// Well-framed command sets of random elements parse exactly as the documented model
    /// says; any cut of them is an error or the same prefix's model, never a panic.
    #[test]
    fn parse_command_matches_model(
        elements in vec(arb_command_element(), 0..12),
        cut in any::<Index>(),
    ) {
        let mut bytes = Vec::new();
        for e in &elements {
            bytes.extend_from_slice(&((e.tag >> 16) as u16).to_le_bytes());
            bytes.extend_from_slice(&(e.tag as u16).to_le_bytes());
            bytes.extend_from_slice(&(e.value.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&e.value);
        }
        prop_assert_eq!(dimse::parse_command(&bytes).ok(), model_command(&elements));
        let _ = dimse::parse_command(&bytes[..cut.index(bytes.len() + 1)]);
    }
}

// ---------------------------------------------------------------------------------------
// Sniffer: a generator of data sets in the four encodings
// ---------------------------------------------------------------------------------------

const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: u32 = 0xFFFE_E000;
const ITEM_DELIMITER: u32 = 0xFFFE_E00D;
const SEQUENCE_DELIMITER: u32 = 0xFFFE_E0DD;
const LAST_WANTED: u32 = 0x0020_000E;

/// The nine attributes the sniffer extracts, with the VR they are written with.
const WANTED: [(u32, [u8; 2]); 9] = [
    (0x0008_0016, *b"UI"),
    (0x0008_0018, *b"UI"),
    (0x0008_0020, *b"DA"),
    (0x0008_0060, *b"CS"),
    (0x0008_1030, *b"LO"),
    (0x0010_0010, *b"PN"),
    (0x0010_0020, *b"LO"),
    (0x0020_000D, *b"UI"),
    (0x0020_000E, *b"UI"),
];

const SHORT_VRS: [&[u8; 2]; 16] = [
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"FD", b"FL", b"IS", b"LO", b"PN", b"SH", b"SS",
    b"TM", b"UI", b"US",
];
const LONG_VRS: [&[u8; 2]; 9] = [
    b"OB", b"OD", b"OF", b"OW", b"SV", b"UC", b"UN", b"UR", b"UT",
];

fn is_long_vr(vr: &[u8; 2]) -> bool {
    LONG_VRS.contains(&vr) || vr == b"SQ"
}

#[derive(Debug, Clone)]
enum Node {
    /// A defined-length element.
    Leaf {
        tag: u32,
        vr: [u8; 2],
        value: Vec<u8>,
    },
    /// A sequence of defined or undefined length.
    Seq {
        tag: u32,
        defined: bool,
        items: Vec<DsItem>,
    },
    /// CP-246: an undefined-length UN whose items are implicit VR little endian.
    Un { tag: u32, items: Vec<DsItem> },
    /// Encapsulated pixel data: an undefined-length OB of defined-length fragments.
    Fragments { tag: u32, fragments: Vec<Vec<u8>> },
}

#[derive(Debug, Clone)]
struct DsItem {
    defined: bool,
    nodes: Vec<Node>,
}

impl Node {
    fn tag(&self) -> u32 {
        match self {
            Node::Leaf { tag, .. }
            | Node::Seq { tag, .. }
            | Node::Un { tag, .. }
            | Node::Fragments { tag, .. } => *tag,
        }
    }

    fn with_tag(mut self, new: u32) -> Node {
        match &mut self {
            Node::Leaf { tag, .. }
            | Node::Seq { tag, .. }
            | Node::Un { tag, .. }
            | Node::Fragments { tag, .. } => *tag = new,
        }
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Syn {
    implicit: bool,
    big: bool,
}

const IMPLICIT_LE: Syn = Syn {
    implicit: true,
    big: false,
};

fn put16(out: &mut Vec<u8>, syn: Syn, v: u16) {
    out.extend_from_slice(&if syn.big {
        v.to_be_bytes()
    } else {
        v.to_le_bytes()
    });
}

fn put32(out: &mut Vec<u8>, syn: Syn, v: u32) {
    out.extend_from_slice(&if syn.big {
        v.to_be_bytes()
    } else {
        v.to_le_bytes()
    });
}

fn put_tag(out: &mut Vec<u8>, syn: Syn, tag: u32) {
    put16(out, syn, (tag >> 16) as u16);
    put16(out, syn, tag as u16);
}

fn put_long_header(out: &mut Vec<u8>, syn: Syn, tag: u32, vr: &[u8; 2], len: u32) {
    put_tag(out, syn, tag);
    if !syn.implicit {
        out.extend_from_slice(vr);
        out.extend_from_slice(&[0, 0]);
    }
    put32(out, syn, len);
}

fn put_delimiter(out: &mut Vec<u8>, syn: Syn, tag: u32) {
    put_tag(out, syn, tag);
    put32(out, syn, 0);
}

fn encode_item(out: &mut Vec<u8>, syn: Syn, item: &DsItem) {
    let mut content = Vec::new();
    for n in &item.nodes {
        encode_node(&mut content, syn, n);
    }
    put_tag(out, syn, ITEM);
    if item.defined {
        put32(out, syn, content.len() as u32);
        out.extend_from_slice(&content);
    } else {
        put32(out, syn, UNDEFINED);
        out.extend_from_slice(&content);
        put_delimiter(out, syn, ITEM_DELIMITER);
    }
}

fn encode_node(out: &mut Vec<u8>, syn: Syn, node: &Node) {
    match node {
        Node::Leaf { tag, vr, value } => {
            if syn.implicit || is_long_vr(vr) {
                put_long_header(out, syn, *tag, vr, value.len() as u32);
            } else {
                put_tag(out, syn, *tag);
                out.extend_from_slice(vr);
                put16(out, syn, value.len() as u16);
            }
            out.extend_from_slice(value);
        }
        Node::Seq {
            tag,
            defined,
            items,
        } => {
            let mut content = Vec::new();
            for item in items {
                encode_item(&mut content, syn, item);
            }
            if *defined {
                put_long_header(out, syn, *tag, b"SQ", content.len() as u32);
                out.extend_from_slice(&content);
            } else {
                put_long_header(out, syn, *tag, b"SQ", UNDEFINED);
                out.extend_from_slice(&content);
                put_delimiter(out, syn, SEQUENCE_DELIMITER);
            }
        }
        Node::Un { tag, items } => {
            // In an implicit VR context an undefined-length UN is just a sequence.
            put_long_header(out, syn, *tag, b"UN", UNDEFINED);
            let inner = if syn.implicit { syn } else { IMPLICIT_LE };
            for item in items {
                encode_item(out, inner, item);
            }
            put_delimiter(out, inner, SEQUENCE_DELIMITER);
        }
        Node::Fragments { tag, fragments } => {
            put_long_header(out, syn, *tag, b"OB", UNDEFINED);
            for f in fragments {
                put_tag(out, syn, ITEM);
                put32(out, syn, f.len() as u32);
                out.extend_from_slice(f);
            }
            put_delimiter(out, syn, SEQUENCE_DELIMITER);
        }
    }
}

/// Any tag outside the item/delimiter group.
fn arb_nested_tag() -> impl Strategy<Value = u32> {
    prop_oneof![
        // Decoys: the wanted tags nested in items must not be reported.
        prop::sample::select(WANTED.iter().map(|(t, _)| *t).collect::<Vec<_>>()),
        any::<u32>().prop_filter("item group", |t| t >> 16 != 0xFFFE),
    ]
}

fn arb_leaf(tag: BoxedStrategy<u32>) -> impl Strategy<Value = Node> {
    prop_oneof![
        4 => (tag.clone(), prop::sample::select(SHORT_VRS.to_vec()), vec(any::<u8>(), 0..24))
            .prop_map(|(tag, vr, value)| Node::Leaf { tag, vr: *vr, value }),
        2 => (tag.clone(), prop::sample::select(LONG_VRS.to_vec()), vec(any::<u8>(), 0..48))
            .prop_map(|(tag, vr, value)| Node::Leaf { tag, vr: *vr, value }),
        // A large value, skipped across many chunks.
        1 => (tag, 1000usize..5000).prop_map(|(tag, n)| Node::Leaf {
            tag,
            vr: *b"OB",
            value: vec![0xA5; n],
        }),
    ]
}

/// A node whose own tag comes from `tag`, with nested content of any tags.
fn arb_node(tag: BoxedStrategy<u32>) -> impl Strategy<Value = Node> {
    let nested = arb_leaf(arb_nested_tag().boxed()).prop_recursive(3, 24, 4, |inner| {
        let items = vec(
            (any::<bool>(), vec(inner, 0..4))
                .prop_map(|(defined, nodes)| DsItem { defined, nodes }),
            0..3,
        );
        prop_oneof![
            (arb_nested_tag(), any::<bool>(), items.clone()).prop_map(|(tag, defined, items)| {
                Node::Seq {
                    tag,
                    defined,
                    items,
                }
            }),
            (arb_nested_tag(), items).prop_map(|(tag, items)| Node::Un { tag, items }),
            (arb_nested_tag(), vec(vec(any::<u8>(), 0..16), 0..3))
                .prop_map(|(tag, fragments)| Node::Fragments { tag, fragments }),
        ]
    });
    prop_oneof![
        3 => arb_leaf(tag.clone()),
        2 => (tag, nested).prop_map(|(tag, node)| node.with_tag(tag)),
    ]
}

/// Top-level tags before (or among) the wanted ones: standard and private groups, never a
/// wanted tag.
fn arb_before_tag() -> BoxedStrategy<u32> {
    (
        prop::sample::select(vec![
            0x0008u16, 0x0009, 0x000B, 0x0010, 0x0011, 0x0013, 0x0018, 0x0019, 0x0020,
        ]),
        any::<u16>(),
    )
        .prop_map(|(g, e)| (u32::from(g) << 16) | u32::from(e))
        .prop_filter("before the last wanted tag, not wanted", |t| {
            // (0008,0005) Specific Character Set is left out: it changes how the sniffer
            // decodes text, and these data sets are written in UTF-8 without it.
            *t < LAST_WANTED && *t != 0x0008_0005 && !WANTED.iter().any(|(w, _)| w == t)
        })
        .boxed()
}

/// Top-level tags after (0020,000E): the sniffer stops at the first one.
fn arb_after_tag() -> BoxedStrategy<u32> {
    prop_oneof![
        (0x000Fu32..=0xFFFF).prop_map(|e| 0x0020_0000 | e),
        prop::sample::select(vec![0x0028_0010u32, 0x0029_1010, 0x0040_A730, 0x7FE0_0010]),
        (0x0021_0000u32..0xFFFE_0000),
        (0xFFFF_0000u32..=0xFFFF_FFFF),
    ]
    .boxed()
}

fn arb_text(pattern: &'static str) -> BoxedStrategy<String> {
    prop_oneof![
        8 => proptest::string::string_regex(pattern).unwrap(),
        // Values up to the sniffer's limit (the padded value must fit in MAX_VALUE_LEN).
        1 => "[a-z^ ]{1000,1023}",
    ]
    .boxed()
}

/// Values of the nine attributes; `None` leaves the element out.
fn arb_wanted_values() -> impl Strategy<Value = Vec<Option<String>>> {
    let uid = || proptest::option::of(arb_text("[0-9.]{0,64}"));
    (
        (uid(), uid()),
        proptest::option::of(arb_text("[0-9]{0,8}")),
        proptest::option::of(arb_text("[A-Z ]{0,16}")),
        proptest::option::of(arb_text("[ -~]{0,64}|\\PC{0,30}")),
        proptest::option::of(arb_text("[A-Za-z^= ]{0,64}|\\PC{0,20}")),
        proptest::option::of(arb_text("[ -~\\x00]{0,64}")),
        (uid(), uid()),
    )
        .prop_map(|((a, b), c, d, e, f, g, (h, i))| vec![a, b, c, d, e, f, g, h, i])
}

#[derive(Debug, Clone)]
struct GeneratedDataset {
    values: Vec<Option<String>>,
    before: Vec<Node>,
    after: Vec<Node>,
    /// Bytes appended after the elements; only used when `after` is not empty (the sniffer
    /// is done before reaching them).
    garbage: Vec<u8>,
}

fn arb_dataset() -> impl Strategy<Value = GeneratedDataset> {
    (
        arb_wanted_values(),
        vec(arb_node(arb_before_tag()), 0..8),
        vec(arb_node(arb_after_tag()), 0..3),
        vec(any::<u8>(), 0..64),
    )
        .prop_map(|(values, before, after, garbage)| GeneratedDataset {
            values,
            before,
            after,
            garbage,
        })
}

impl GeneratedDataset {
    /// The top-level nodes in ascending tag order.
    fn nodes(&self) -> Vec<Node> {
        let mut nodes = self.before.clone();
        for ((tag, vr), value) in WANTED.iter().zip(&self.values) {
            if let Some(v) = value {
                let mut value = v.clone().into_bytes();
                if value.len() % 2 == 1 {
                    value.push(if vr == b"UI" { 0 } else { b' ' });
                }
                nodes.push(Node::Leaf {
                    tag: *tag,
                    vr: *vr,
                    value,
                });
            }
        }
        nodes.sort_by_key(Node::tag);
        let mut after = self.after.clone();
        after.sort_by_key(Node::tag);
        nodes.extend(after);
        nodes
    }

    fn encode(&self, syn: Syn) -> Vec<u8> {
        let mut out = Vec::new();
        for n in self.nodes() {
            encode_node(&mut out, syn, &n);
        }
        if !self.after.is_empty() {
            out.extend_from_slice(&self.garbage);
        }
        out
    }

    /// The bytes of the data set in `encoding` (deflated at `level`).
    fn bytes(&self, encoding: Encoding, level: u32) -> Vec<u8> {
        match encoding {
            Encoding::ImplicitVrLittle => self.encode(IMPLICIT_LE),
            Encoding::ExplicitVrLittle => self.encode(Syn {
                implicit: false,
                big: false,
            }),
            Encoding::ExplicitVrBig => self.encode(Syn {
                implicit: false,
                big: true,
            }),
            Encoding::DeflatedExplicitVrLittle => {
                let plain = self.encode(Syn {
                    implicit: false,
                    big: false,
                });
                let mut z =
                    flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(level));
                z.write_all(&plain).unwrap();
                z.finish().unwrap()
            }
        }
    }

    /// What the sniffer must report: values trimmed of trailing NUL/space (and leading
    /// spaces for the non-UID ones), empty read as absent. (Fields the summary may gain
    /// beyond these nine stay at their default: these data sets do not carry them.)
    #[allow(clippy::needless_update)]
    fn expected(&self) -> DatasetSummary {
        let v = |i: usize, uid: bool| {
            self.values[i].as_deref().and_then(|s| {
                let s = s.trim_end_matches(['\0', ' ']);
                let s = if uid { s } else { s.trim_start_matches(' ') };
                (!s.is_empty()).then(|| s.to_owned())
            })
        };
        DatasetSummary {
            sop_class_uid: v(0, true),
            sop_instance_uid: v(1, true),
            study_date: v(2, false),
            modality: v(3, false),
            study_description: v(4, false),
            patient_name: v(5, false),
            patient_id: v(6, false),
            study_instance_uid: v(7, true),
            series_instance_uid: v(8, true),
            ..DatasetSummary::default()
        }
    }
}

const ENCODINGS: [Encoding; 4] = [
    Encoding::ImplicitVrLittle,
    Encoding::ExplicitVrLittle,
    Encoding::ExplicitVrBig,
    Encoding::DeflatedExplicitVrLittle,
];

/// Feeds `parts` to a fresh sniffer; the summary, whether it was done, and the sniffer.
fn sniff(encoding: Encoding, parts: &[&[u8]]) -> Result<(bool, DatasetSummary), SniffError> {
    let mut s = Sniffer::new(encoding);
    for p in parts {
        s.feed(p)?;
    }
    let done = s.is_done();
    if done {
        // Feeding after done is a no-op, whatever the bytes.
        s.feed(&[0xFF; 64])?;
        s.feed(b"\xfe\xff\x00\xe0garbage")?;
        assert!(s.is_done(), "a done sniffer stays done");
    }
    s.finish().map(|summary| (done, summary))
}

/// Feeds `parts` to a validating sniffer and finishes it.
fn validate(encoding: Encoding, parts: &[&[u8]]) -> Result<DatasetSummary, SniffError> {
    let mut s = Sniffer::validating(encoding);
    for p in parts {
        s.feed(p)?;
    }
    assert!(
        !s.is_done(),
        "a validating sniffer is never done before finish"
    );
    s.finish()
}

proptest! {
    #![proptest_config(cases(1))]

    /// The generated values come back exactly, whatever the encoding, the nesting before
    /// them, and the points at which the data set is split.
    #[test]
    fn sniffer_finds_generated_values(
        ds in arb_dataset(),
        cuts in vec(any::<Index>(), 0..24),
        level in 0u32..=9,
    ) {
        let expected = ds.expected();
        for encoding in ENCODINGS {
            let bytes = ds.bytes(encoding, level);
            let whole = sniff(encoding, &[&bytes]);
            prop_assert_eq!(
                whole.clone(),
                Ok((!ds.after.is_empty(), expected.clone())),
                "{:?}, one feed",
                encoding
            );
            let parts = chunks(&bytes, &cuts);
            prop_assert_eq!(sniff(encoding, &parts), whole.clone(), "{:?}, split", encoding);
            // Garbage after the elements is for the plain sniffer to stop before.
            let well_formed = ds.after.is_empty() || ds.garbage.is_empty();
            if well_formed {
                prop_assert_eq!(validate(encoding, &parts), Ok(expected.clone()), "{:?}, validated", encoding);
            }
            if well_formed && encoding != Encoding::DeflatedExplicitVrLittle && !bytes.is_empty() {
                let cut = &bytes[..bytes.len() - 1];
                prop_assert!(validate(encoding, &[cut]).is_err(), "{:?}, one byte short", encoding);
            }
            if bytes.len() <= 4096 {
                let singles: Vec<&[u8]> = bytes.chunks(1).collect();
                prop_assert_eq!(sniff(encoding, &singles), whole, "{:?}, byte by byte", encoding);
            }
        }
    }
}

/// Tokens of a hostile element stream: deep nesting, stray delimiters, huge lengths.
#[derive(Debug, Clone)]
enum Token {
    UndefinedSequence(u32),
    UndefinedUn(u32),
    UndefinedOb(u32),
    Item(u32),
    ItemDelimiter,
    SequenceDelimiter,
    /// An element header with any VR and length, then some bytes of its value.
    Element(u32, [u8; 2], u32, Vec<u8>),
    Raw(Vec<u8>),
    /// This many undefined-length sequences, each holding an undefined-length item.
    Nest(u32, usize),
}

fn arb_token() -> impl Strategy<Value = Token> {
    let tag = prop_oneof![
        2 => prop::sample::select(WANTED.iter().map(|(t, _)| *t).collect::<Vec<_>>()),
        4 => 0x0008_0000u32..0x0020_000F,
        1 => any::<u32>(),
    ];
    let vr = prop_oneof![
        prop::sample::select(
            SHORT_VRS
                .iter()
                .chain(&LONG_VRS)
                .map(|v| **v)
                .collect::<Vec<_>>()
        ),
        Just(*b"SQ"),
        any::<[u8; 2]>(),
    ];
    prop_oneof![
        4 => tag.clone().prop_map(Token::UndefinedSequence),
        1 => tag.clone().prop_map(Token::UndefinedUn),
        1 => tag.clone().prop_map(Token::UndefinedOb),
        4 => prop_oneof![Just(UNDEFINED), 0u32..16, any::<u32>()].prop_map(Token::Item),
        1 => Just(Token::ItemDelimiter),
        1 => Just(Token::SequenceDelimiter),
        3 => (
            tag,
            vr,
            prop_oneof![
                0u32..32,
                0u32..=MAX_VALUE_LEN as u32,
                Just(MAX_VALUE_LEN as u32 + 1),
                Just(UNDEFINED),
                any::<u32>(),
            ],
            vec(any::<u8>(), 0..40),
        )
            .prop_map(|(t, v, l, b)| Token::Element(t, v, l, b)),
        1 => vec(any::<u8>(), 0..16).prop_map(Token::Raw),
        2 => (0x0008_0000u32..0x0020_000F, 1usize..100).prop_map(|(t, n)| Token::Nest(t, n)),
    ]
}

fn encode_tokens(tokens: &[Token], syn: Syn) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tokens {
        match t {
            Token::UndefinedSequence(tag) => put_long_header(&mut out, syn, *tag, b"SQ", UNDEFINED),
            Token::UndefinedUn(tag) => put_long_header(&mut out, syn, *tag, b"UN", UNDEFINED),
            Token::UndefinedOb(tag) => put_long_header(&mut out, syn, *tag, b"OB", UNDEFINED),
            Token::Item(len) => {
                put_tag(&mut out, syn, ITEM);
                put32(&mut out, syn, *len);
            }
            Token::ItemDelimiter => put_delimiter(&mut out, syn, ITEM_DELIMITER),
            Token::SequenceDelimiter => put_delimiter(&mut out, syn, SEQUENCE_DELIMITER),
            Token::Element(tag, vr, len, bytes) => {
                if syn.implicit || is_long_vr(vr) {
                    put_long_header(&mut out, syn, *tag, vr, *len);
                } else {
                    put_tag(&mut out, syn, *tag);
                    out.extend_from_slice(vr);
                    put16(&mut out, syn, *len as u16);
                }
                out.extend_from_slice(bytes);
            }
            Token::Raw(bytes) => out.extend_from_slice(bytes),
            Token::Nest(tag, n) => {
                for _ in 0..*n {
                    put_long_header(&mut out, syn, *tag, b"SQ", UNDEFINED);
                    put_tag(&mut out, syn, ITEM);
                    put32(&mut out, syn, UNDEFINED);
                }
            }
        }
    }
    out
}

/// Peak heap use allowed to one sniffer. The plain encodings hold the partial value
/// (at most `MAX_VALUE_LEN` bytes), the nesting stack, and the nine summary strings; a
/// value that is not UTF-8 is decoded lossily, each bad byte becoming a 3-byte U+FFFD, so
/// a summary string can reach 3 x `MAX_VALUE_LEN` bytes (about 40 KiB in all at worst,
/// see `sniffer_worst_case_memory`). The deflated encoding adds a fixed inflate state
/// (about 43 KiB).
fn memory_bound(encoding: Encoding) -> usize {
    match encoding {
        Encoding::DeflatedExplicitVrLittle => 128 * 1024,
        _ => 48 * 1024,
    }
}

/// Feeds every part (continuing after an error, as the service does not, to also check
/// that a failed sniffer stays failed) and finishes; returns the peak memory.
fn sniff_hostile(encoding: Encoding, parts: &[&[u8]]) -> usize {
    let ((), peak) = peak_memory(|| {
        let mut s = Sniffer::new(encoding);
        let mut first_error = None;
        for p in parts {
            let r = s.feed(p);
            match (&first_error, r) {
                (None, Err(e)) => first_error = Some(e),
                (Some(e), r) => assert_eq!(r, Err(e.clone()), "a failed sniffer stays failed"),
                (None, Ok(())) => {}
            }
        }
        let done = s.is_done();
        let finished = s.finish();
        if let Some(e) = first_error {
            assert_eq!(finished, Err(e));
        } else if done {
            assert!(finished.is_ok());
        }
    });
    peak
}

proptest! {
    #![proptest_config(cases(2))]

    #[test]
    fn sniffer_survives_arbitrary_bytes(
        bytes in vec(any::<u8>(), 0..4096),
        cuts in vec(any::<Index>(), 0..16),
    ) {
        let parts = chunks(&bytes, &cuts);
        for encoding in ENCODINGS {
            let peak = sniff_hostile(encoding, &parts);
            prop_assert!(peak <= memory_bound(encoding), "{:?}: peak {} bytes", encoding, peak);
        }
    }

    #[test]
    fn sniffer_survives_hostile_element_streams(
        tokens in vec(arb_token(), 0..200),
        repeat in 1usize..16,
        cuts in vec(any::<Index>(), 0..16),
        level in 0u32..=9,
    ) {
        for encoding in ENCODINGS {
            let syn = match encoding {
                Encoding::ImplicitVrLittle => IMPLICIT_LE,
                Encoding::ExplicitVrBig => Syn { implicit: false, big: true },
                _ => Syn { implicit: false, big: false },
            };
            // Repetition makes long streams (deep nesting, many values) from few tokens.
            let plain = encode_tokens(&tokens, syn).repeat(repeat);
            let bytes = if encoding == Encoding::DeflatedExplicitVrLittle {
                let mut z = flate2::write::DeflateEncoder::new(
                    Vec::new(),
                    flate2::Compression::new(level),
                );
                z.write_all(&plain).unwrap();
                z.finish().unwrap()
            } else {
                plain
            };
            let parts = chunks(&bytes, &cuts);
            let peak = sniff_hostile(encoding, &parts);
            prop_assert!(peak <= memory_bound(encoding), "{:?}: peak {} bytes", encoding, peak);
        }
    }
}

/// Deep nesting is refused at the documented depth with bounded memory, however deep the
/// input goes.
#[test]
fn sniffer_nesting_is_bounded() {
    for encoding in [
        Encoding::ImplicitVrLittle,
        Encoding::ExplicitVrLittle,
        Encoding::ExplicitVrBig,
    ] {
        let syn = match encoding {
            Encoding::ImplicitVrLittle => IMPLICIT_LE,
            Encoding::ExplicitVrBig => Syn {
                implicit: false,
                big: true,
            },
            _ => Syn {
                implicit: false,
                big: false,
            },
        };
        let nest = encode_tokens(
            &[
                Token::UndefinedSequence(0x0008_1110),
                Token::Item(UNDEFINED),
            ],
            syn,
        );
        let bytes = nest.repeat(100_000);
        let (result, peak) = peak_memory(|| {
            let mut s = Sniffer::new(encoding);
            s.feed(&bytes)
        });
        assert!(
            matches!(result, Err(SniffError::TooDeep { .. })),
            "{encoding:?}: {result:?}"
        );
        assert!(peak <= memory_bound(encoding), "{encoding:?}: peak {peak}");
    }
}

/// The most memory a sniffer can be made to hold: all nine values at the size limit and
/// not UTF-8 (so each can be kept as up to 3 x `MAX_VALUE_LEN` bytes of U+FFFD), fed one
/// byte at a time, then the deepest nesting allowed.
#[test]
fn sniffer_worst_case_memory() {
    let mut body = Vec::new();
    let syn = Syn {
        implicit: false,
        big: false,
    };
    for (tag, _) in WANTED {
        // OB: a long VR, so the 1024-byte value fits every encoding's length field.
        encode_node(
            &mut body,
            syn,
            &Node::Leaf {
                tag,
                vr: *b"OB",
                value: vec![0xFF; MAX_VALUE_LEN],
            },
        );
    }
    body.extend(encode_tokens(&[Token::Nest(0x0020_000E, 200)], syn));
    for encoding in [
        Encoding::ExplicitVrLittle,
        Encoding::DeflatedExplicitVrLittle,
    ] {
        let bytes = if encoding == Encoding::DeflatedExplicitVrLittle {
            let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(6));
            z.write_all(&body).unwrap();
            z.finish().unwrap()
        } else {
            body.clone()
        };
        let (result, peak) = peak_memory(|| {
            let mut s = Sniffer::new(encoding);
            let mut r = Ok(());
            for b in bytes.chunks(1) {
                r = s.feed(b);
                if r.is_err() {
                    break;
                }
            }
            r
        });
        assert!(
            matches!(result, Err(SniffError::TooDeep { .. })),
            "{encoding:?}: {result:?}"
        );
        assert!(peak <= memory_bound(encoding), "{encoding:?}: peak {peak}");
        assert!(
            peak > 9 * MAX_VALUE_LEN,
            "{encoding:?}: the nine values are kept: {peak}"
        );
    }
}

/// Regression found by the `sniff` fuzz target: a deflated data set whose header is
/// complete (the sniffer reaches (0020,0013)) but whose DEFLATE stream turns corrupt later
/// (here an invalid block type, byte 0x07, right after a sync-flushed first block). Fed
/// in two pieces, the sniffer finishes with the four UIDs; fed whole, the single inflate
/// call that produces the header also meets the bad block, and the bytes it produced must
/// still reach the parser: the outcome must not depend on the P-DATA fragmentation.
#[test]
fn deflate_error_after_the_header() {
    const HEX: &str = "e260106308f5946230d433d2b33031d033343030b0d033d533d4330162a028030783\
                       045005075885b19e098302032f90cf06e103797c48b2a640be308367301383a102000000\
                       ffff07";
    let hex: String = HEX.split_whitespace().collect();
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let encoding = Encoding::DeflatedExplicitVrLittle;
    let (head, tail) = bytes.split_at(bytes.len() - 1);
    let split = sniff(encoding, &[head, tail]);
    let expected = DatasetSummary {
        sop_class_uid: Some("1.2.840.10008.5.1.4.1.1.2".into()),
        sop_instance_uid: Some("1.2.3.4".into()),
        study_instance_uid: Some("1.2.3".into()),
        series_instance_uid: Some("1.2.3.5".into()),
        ..DatasetSummary::default()
    };
    assert_eq!(split, Ok((true, expected)));
    assert_eq!(sniff(encoding, &[&bytes]), split, "fed whole");
}

/// A wanted value one byte over the limit is refused; one at the limit is kept.
#[test]
fn sniffer_value_limit() {
    for long in [MAX_VALUE_LEN, MAX_VALUE_LEN + 2] {
        let ds = GeneratedDataset {
            values: {
                let mut v = vec![None; 9];
                v[5] = Some("A".repeat(long));
                v
            },
            before: vec![],
            after: vec![],
            garbage: vec![],
        };
        for encoding in ENCODINGS {
            let got = sniff(encoding, &[&ds.bytes(encoding, 6)]);
            if long <= MAX_VALUE_LEN {
                assert_eq!(got, Ok((false, ds.expected())), "{encoding:?}");
            } else {
                assert!(
                    matches!(
                        got,
                        Err(SniffError::ValueTooLong {
                            tag: 0x0010_0010,
                            ..
                        })
                    ),
                    "{encoding:?}: {got:?}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Naming
// ---------------------------------------------------------------------------------------

/// Strings built from the characters that matter for path safety.
fn arb_hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9./\\\\\\x00 ]{0,80}",
        prop::sample::select(vec![
            "..",
            ".",
            "/",
            "\\",
            "\0",
            "../1.2",
            "1.2/../3",
            "1.2\\..\\3",
            "/1.2",
            "1.2\0.3",
            "1..2",
            ".1",
            "1.",
            "",
            " ",
            "\0",
            "1.2\0",
            "1.2 ",
            "1.2\0 \0",
        ])
        .prop_map(String::from),
        Just("1.".repeat(32) + "1"),
        Just("1".repeat(65)),
    ]
}

/// The documented UID rule, written independently: after removing trailing NUL/space,
/// 1-64 characters of digits and dots, no empty component.
fn model_uid(v: Option<&str>) -> Option<&str> {
    let t = v?.trim_end_matches(['\0', ' ']);
    let ok = !t.is_empty()
        && t.len() <= 64
        && t.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && t.split('.').all(|c| !c.is_empty());
    ok.then_some(t)
}

fn arb_naming() -> impl Strategy<Value = Naming> {
    prop::sample::select(vec![Naming::Hierarchical, Naming::Date, Naming::Flat])
}

fn check_safe_path(path: &str, naming: Naming) -> Result<(), TestCaseError> {
    prop_assert!(!path.is_empty());
    prop_assert!(!path.starts_with('/'), "absolute: {:?}", path);
    prop_assert!(!path.contains('\\') && !path.contains('\0'), "{:?}", path);
    prop_assert!(path.ends_with(".dcm"), "{:?}", path);
    let parts: Vec<&str> = path.split('/').collect();
    let expected_parts = match naming {
        Naming::Hierarchical => 3,
        Naming::Date => 5,
        Naming::Flat => 1,
    };
    prop_assert_eq!(parts.len(), expected_parts, "{:?}", path);
    for p in &parts {
        prop_assert!(
            !p.is_empty() && *p != "." && *p != "..",
            "component {:?} of {:?}",
            p,
            path
        );
        prop_assert!(
            p.bytes()
                .all(|b| b.is_ascii_digit() || b == b'.' || b.is_ascii_lowercase()),
            "component {:?} of {:?}",
            p,
            path
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(1))]

    #[test]
    fn relative_path_is_always_safe(
        naming in arb_naming(),
        study in proptest::option::of(arb_hostile_text()),
        series in proptest::option::of(arb_hostile_text()),
        sop in proptest::option::of(arb_hostile_text()),
        date in proptest::option::of(arb_hostile_text()),
        today in arb_hostile_text(),
    ) {
        let result = naming::relative_path(
            naming,
            study.as_deref(),
            series.as_deref(),
            sop.as_deref(),
            date.as_deref(),
            &today,
        );
        let valid = model_uid(study.as_deref()).is_some()
            && model_uid(series.as_deref()).is_some()
            && model_uid(sop.as_deref()).is_some();
        match result {
            Ok(named) => {
                prop_assert!(valid, "accepted invalid UIDs: {:?}", named);
                check_safe_path(&named.path, naming)?;
            }
            Err(e) => {
                prop_assert!(!valid, "refused valid UIDs: {}", e);
                let text = e.to_string();
                prop_assert!(
                    text.chars().all(|c| (' '..='~').contains(&c) && c != '\\'),
                    "error text is not a clean Error Comment: {:?}",
                    text
                );
            }
        }
    }

    #[test]
    fn relative_path_layout_for_valid_uids(
        naming in arb_naming(),
        study in arb_valid_uid(),
        series in arb_valid_uid(),
        sop in arb_valid_uid(),
        pads in any::<[u8; 3]>(),
        date in prop_oneof![
            (1u32..=9999, 1u32..=12, 1u32..=28).prop_map(|(y, m, d)| Some(format!("{y:04}{m:02}{d:02}"))),
            Just(None),
            Just(Some("20230230".to_string())),
            Just(Some("2024022".to_string())),
        ],
    ) {
        let pad = |s: &str, p: u8| match p % 4 {
            0 => s.to_owned(),
            1 => format!("{s}\0"),
            2 => format!("{s} "),
            _ => format!("{s}\0 \0"),
        };
        let today = "19991231";
        let padded_sop = pad(&sop, pads[2]);
        let named = naming::relative_path(
            naming,
            Some(&pad(&study, pads[0])),
            Some(&pad(&series, pads[1])),
            Some(&padded_sop),
            date.as_deref(),
            today,
        )
        .unwrap();
        let day = match date.as_deref() {
            Some(d) if naming::is_valid_date(d) => d.to_owned(),
            _ => today.to_owned(),
        };
        let expected = match naming {
            Naming::Hierarchical => format!("{study}/{series}/{sop}.dcm"),
            Naming::Flat => format!("{sop}.dcm"),
            Naming::Date => format!("{}/{}/{}/{study}/{sop}.dcm", &day[0..4], &day[4..6], &day[6..8]),
        };
        check_safe_path(&named.path, naming)?;
        prop_assert_eq!(named.path, expected);
        prop_assert_eq!(named.sop_instance_uid, sop.as_str());
    }
}
