//! The checks run by the fuzz targets in `fuzz_targets/`, one public function per target.
//! Each takes the fuzzer's bytes, drives the public API of `storescp-core` the way the
//! server does, and panics (`assert!`) when an oracle fails; a panic, an abort, a timeout
//! or excessive memory is what libFuzzer reports as a finding.
//!
//! `cargo test` in this directory replays every file of the committed seed corpus, of
//! `regressions/` (past findings) and of `artifacts/` (new ones, if any) through the same
//! functions on stable Rust, without libFuzzer.

use std::net::{IpAddr, Ipv4Addr};

use _core::association::{self, AcceptPolicy, AllowedCaller, Negotiation};
use _core::dimse::{self, command_field, status, Command};
use _core::naming::{self, Naming};
use _core::pdu::{self, pdu_type, AssociateAc, AssociateRq, Pdv};
use _core::sniff::{DatasetSummary, Encoding, SniffError, Sniffer};

/// Largest P-DATA-TF body the reassembly target accepts, as the server's default.
const MAX_PDU: u32 = 16384;
/// The server's bound on a command set (service.rs `MAX_COMMAND_SET`).
const MAX_COMMAND_SET: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------
// pdu
// ---------------------------------------------------------------------------------------

/// True if no string went through a lossy UTF-8 replacement: only then does re-encoding
/// keep every field within the length of its frame.
fn lossless<'a>(strings: impl IntoIterator<Item = &'a str>) -> bool {
    strings.into_iter().all(|s| !s.contains('\u{FFFD}'))
}

fn rq_strings(rq: &AssociateRq) -> Vec<&str> {
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
    all
}

fn ac_strings(ac: &AssociateAc) -> Vec<&str> {
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
    all
}

/// Splits a PDU this crate encoded into its body, checking the header.
fn encoded_body(bytes: &[u8], expected_type: u8) -> &[u8] {
    let (header, body) = bytes.split_first_chunk::<6>().expect("PDU header");
    let (kind, len) = pdu::parse_pdu_header(header).expect("encoded PDU header parses");
    assert_eq!(kind, expected_type);
    assert_eq!(len as usize, body.len(), "PDU length field");
    body
}

fn rq_round_trip(body: &[u8]) -> Option<AssociateRq> {
    let rq = pdu::parse_associate_rq(body).ok()?;
    assert!(rq.protocol_version & 1 == 1);
    assert!(!rq.presentation_contexts.is_empty());
    if lossless(rq_strings(&rq)) {
        let bytes = pdu::encode_associate_rq(&rq);
        let again = pdu::parse_associate_rq(encoded_body(&bytes, pdu_type::ASSOCIATE_RQ))
            .expect("a re-encoded A-ASSOCIATE-RQ parses");
        assert_eq!(again, rq, "A-ASSOCIATE-RQ round trip");
    }
    Some(rq)
}

fn ac_round_trip(body: &[u8]) {
    let Ok(ac) = pdu::parse_associate_ac(body) else {
        return;
    };
    if lossless(ac_strings(&ac)) {
        let bytes = pdu::encode_associate_ac(&ac);
        let again = pdu::parse_associate_ac(encoded_body(&bytes, pdu_type::ASSOCIATE_AC))
            .expect("a re-encoded A-ASSOCIATE-AC parses");
        assert_eq!(again, ac, "A-ASSOCIATE-AC round trip");
    }
}

/// Reads the PDVs of a P-DATA-TF body, re-encodes each as its own PDU and reads it back.
fn pdvs_round_trip(body: &[u8]) -> Vec<Pdv<'_>> {
    let mut good = Vec::new();
    let mut consumed = 0usize;
    let mut items = 0usize;
    for pdv in pdu::pdvs(body) {
        items += 1;
        assert!(
            items <= body.len() / 6 + 1,
            "more PDV items than bytes allow"
        );
        let Ok(pdv) = pdv else { break };
        consumed += 6 + pdv.data.len();
        good.push(pdv);
    }
    assert!(consumed <= body.len());
    for pdv in &good {
        let mut out = Vec::new();
        pdu::encode_p_data(
            &mut out,
            pdv.context_id,
            pdv.is_command,
            pdv.is_last,
            pdv.data,
        );
        let again: Vec<Pdv<'_>> = pdu::pdvs(encoded_body(&out, pdu_type::P_DATA_TF))
            .collect::<Result<_, _>>()
            .expect("an encoded PDV parses");
        assert_eq!(again, [*pdv]);
    }
    good
}

/// Target `pdu`: the PDU header, then every body parser over the bytes after it (and over
/// the whole input as a body), with round trips of whatever parses.
pub fn pdu(data: &[u8]) {
    let mut bodies = vec![data];
    if let Some((header, body)) = data.split_first_chunk::<6>() {
        match pdu::parse_pdu_header(header) {
            Ok((kind, len)) => {
                assert!((1..=7).contains(&kind));
                if matches!(kind, 3 | 5 | 6 | 7) {
                    assert_eq!(len, 4);
                }
                assert!(pdu::check_pdu_length(kind, len, MAX_PDU).is_ok() == (len <= MAX_PDU));
            }
            Err(e) => {
                let _ = (e.to_string(), e.abort_reason(), e.associate_rj());
            }
        }
        bodies.push(body);
    }
    for body in bodies {
        if let Err(e) = pdu::parse_associate_rq(body) {
            let _ = (e.to_string(), e.abort_reason(), e.associate_rj());
        }
        rq_round_trip(body);
        ac_round_trip(body);
        if let Ok((result, source, reason)) = pdu::parse_associate_rj(body) {
            let bytes = pdu::encode_associate_rj(result, source, reason);
            assert_eq!(
                pdu::parse_associate_rj(encoded_body(&bytes, pdu_type::ASSOCIATE_RJ)),
                Ok((result, source, reason))
            );
        }
        assert_eq!(pdu::parse_abort(body).is_ok(), body.len() == 4);
        pdvs_round_trip(body);
    }
}

// ---------------------------------------------------------------------------------------
// association
// ---------------------------------------------------------------------------------------

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
const IMPLICIT: &str = "1.2.840.10008.1.2";
const EXPLICIT: &str = "1.2.840.10008.1.2.1";
const BIG: &str = "1.2.840.10008.1.2.2";
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";

fn policy(strict: bool) -> AcceptPolicy {
    AcceptPolicy {
        ae_title: "STORESCP".into(),
        called_ae_check: strict,
        allowed_calling: if strict {
            vec![
                AllowedCaller::parse("MODALITY").expect("allowed caller"),
                AllowedCaller::parse("CT1@127.0.0.1").expect("allowed caller"),
            ]
        } else {
            vec![]
        },
        abstract_syntaxes: [CT, MR, "1.2"].map(String::from).into(),
        transfer_syntaxes: [IMPLICIT, EXPLICIT, BIG, DEFLATED, "1.2"]
            .map(String::from)
            .into(),
        max_pdu_length: MAX_PDU,
    }
}

/// Target `association`: parse an A-ASSOCIATE-RQ body, negotiate it under an open and a
/// strict fixed policy, and check the answer and its encoding.
pub fn association(data: &[u8]) {
    let Some(rq) = rq_round_trip(data) else {
        return;
    };
    let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
    for strict in [false, true] {
        let policy = policy(strict);
        match association::negotiate(&rq, &policy, peer) {
            Negotiation::Accept { ac, contexts } => {
                assert_eq!(
                    ac.presentation_contexts.len(),
                    rq.presentation_contexts.len()
                );
                let mut accepted = 0;
                for (pc, res) in rq
                    .presentation_contexts
                    .iter()
                    .zip(&ac.presentation_contexts)
                {
                    assert_eq!(pc.id, res.id);
                    if res.result == pdu::presentation_result::ACCEPTANCE {
                        accepted += 1;
                        assert!(policy.transfer_syntaxes.contains(&res.transfer_syntax));
                        assert!(pc.transfer_syntaxes.contains(&res.transfer_syntax));
                        assert!(
                            pc.abstract_syntax == association::VERIFICATION_SOP_CLASS
                                || policy.abstract_syntaxes.contains(&pc.abstract_syntax)
                        );
                    } else {
                        assert!(matches!(res.result, 3 | 4), "result {}", res.result);
                    }
                }
                assert_eq!(accepted, contexts.len());
                assert!(ac.role_selections.iter().all(|r| !r.scp_role));
                if strict {
                    assert_eq!(rq.called_ae, policy.ae_title);
                }
                // What is sent back must itself be a well-formed A-ASSOCIATE-AC.
                let bytes = pdu::encode_associate_ac(&ac);
                let body = encoded_body(&bytes, pdu_type::ASSOCIATE_AC);
                let parsed = pdu::parse_associate_ac(body).expect("our A-ASSOCIATE-AC parses");
                if lossless(ac_strings(&ac))
                    && ac.called_ae.len() <= 16
                    && ac.calling_ae.len() <= 16
                {
                    assert_eq!(parsed, ac, "A-ASSOCIATE-AC round trip");
                }
            }
            Negotiation::Reject {
                result,
                source,
                reason,
                why,
            } => {
                assert_eq!((result, source), (1, 1));
                assert!(matches!(reason, 2 | 3 | 7), "reason {reason}: {why}");
                if !strict {
                    assert_eq!(reason, 2, "an open policy refuses only the context name");
                }
                let bytes = pdu::encode_associate_rj(result, source, reason);
                assert_eq!(
                    pdu::parse_associate_rj(encoded_body(&bytes, pdu_type::ASSOCIATE_RJ)),
                    Ok((result, source, reason))
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// dimse
// ---------------------------------------------------------------------------------------

/// The (tag, value) elements of a command set this crate encoded, checking the framing.
fn command_elements(bytes: &[u8]) -> Vec<(u32, &[u8])> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some((header, tail)) = rest.split_first_chunk::<8>() {
        let tag = (u32::from(u16::from_le_bytes([header[0], header[1]])) << 16)
            | u32::from(u16::from_le_bytes([header[2], header[3]]));
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let (value, after) = tail.split_at_checked(len).expect("element within the set");
        assert!(len.is_multiple_of(2), "odd value length in ({tag:08X})");
        out.push((tag, value));
        rest = after;
    }
    assert!(rest.is_empty(), "trailing bytes after the last element");
    let group_len = out.first().map(|(t, v)| (*t, v.len()));
    assert_eq!(group_len, Some((0, 4)), "Command Group Length first");
    out
}

/// Checks a response to `request`; `echoes_uids` when it carries the request's UIDs (all
/// but C-ECHO-RSP, which names the Verification SOP Class).
fn check_response(bytes: &[u8], request: &Command, expected_status: u16, echoes_uids: bool) {
    let elements = command_elements(bytes);
    let rsp = dimse::parse_command(bytes).expect("our response parses");
    assert_eq!(rsp.command_field, request.command_field | 0x8000);
    assert_eq!(rsp.message_id_being_responded_to, Some(request.message_id));
    assert_eq!(rsp.status, Some(expected_status));
    assert!(!rsp.has_data_set());
    for (tag, value) in elements {
        if tag == 0x0000_0902 {
            assert!(value.len() <= dimse::MAX_ERROR_COMMENT);
            assert!(value
                .iter()
                .all(|b| (b' '..=b'~').contains(b) && *b != b'\\'));
        }
    }
    if !echoes_uids {
        return;
    }
    // UIDs are echoed; those longer than 64 bytes are cut, the rest must come back.
    for (sent, got) in [
        (&request.affected_sop_class_uid, &rsp.affected_sop_class_uid),
        (
            &request.affected_sop_instance_uid,
            &rsp.affected_sop_instance_uid,
        ),
    ] {
        if let Some(uid) = sent.as_deref().filter(|u| u.len() <= 64) {
            assert_eq!(got.as_deref(), Some(uid));
        }
    }
}

/// Target `dimse`: parse a command set; answer whatever parses and read the answer back.
pub fn dimse(data: &[u8]) {
    match dimse::parse_command(data) {
        Err(e) => {
            let text = e.to_string();
            assert!(!text.is_empty());
        }
        Ok(cmd) => {
            let _ = (
                dimse::command_field::name(cmd.command_field),
                cmd.has_data_set(),
            );
            let comment = String::from_utf8_lossy(data.get(..80).unwrap_or(data)).into_owned();
            let rsp = dimse::encode_failure_rsp(&cmd, status::UNRECOGNIZED_OPERATION, &comment);
            check_response(&rsp, &cmd, status::UNRECOGNIZED_OPERATION, true);
            if cmd.command_field == command_field::C_STORE_RQ {
                let rsp = dimse::encode_c_store_rsp(
                    cmd.message_id,
                    cmd.affected_sop_class_uid.as_deref().unwrap_or_default(),
                    cmd.affected_sop_instance_uid.as_deref().unwrap_or_default(),
                    status::OUT_OF_RESOURCES,
                    Some(&comment),
                );
                check_response(&rsp, &cmd, status::OUT_OF_RESOURCES, true);
            }
            if cmd.command_field == command_field::C_ECHO_RQ {
                let rsp = dimse::encode_c_echo_rsp(cmd.message_id, status::SUCCESS);
                check_response(&rsp, &cmd, status::SUCCESS, false);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// sniff
// ---------------------------------------------------------------------------------------

const ENCODINGS: [Encoding; 4] = [
    Encoding::ImplicitVrLittle,
    Encoding::ExplicitVrLittle,
    Encoding::ExplicitVrBig,
    Encoding::DeflatedExplicitVrLittle,
];

/// Feeds `parts` to a fresh sniffer, checking the documented feed contract on the way.
fn sniff_parts(encoding: Encoding, parts: &[&[u8]]) -> Result<(bool, DatasetSummary), SniffError> {
    let mut s = Sniffer::new(encoding);
    let mut first_error: Option<SniffError> = None;
    for part in parts {
        let r = s.feed(part);
        match &first_error {
            Some(e) => assert_eq!(r.as_ref(), Err(e), "a failed sniffer stays failed"),
            None => first_error = r.err(),
        }
    }
    let done = s.is_done();
    if done {
        assert!(first_error.is_none(), "done and failed at once");
        // Feeding after done is a no-op whatever the bytes.
        assert_eq!(s.feed(b"\xfe\xff\xdd\xe0\xff\xff\xff\xff garbage"), Ok(()));
        assert!(s.is_done());
    }
    let result = s.finish();
    if let Some(e) = first_error {
        assert_eq!(
            result.as_ref().err(),
            Some(&e),
            "finish repeats the feed error"
        );
    }
    // A data set that validates to its end sniffs to the same summary.
    let mut v = Sniffer::validating(encoding);
    let validated = parts
        .iter()
        .try_for_each(|part| v.feed(part))
        .and_then(|()| v.finish());
    if let Ok(summary) = &validated {
        assert_eq!(result.as_ref().ok(), Some(summary), "validating disagrees");
    }
    result.map(|summary| (done, summary))
}

/// Target `sniff`: byte 0 picks the encoding, bytes 1-4 are chunk sizes (1-256, cycled),
/// the rest is the data set. The result must not depend on how the data set is split.
pub fn sniff(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let encoding = ENCODINGS[usize::from(selector & 3)];
    let (sizes, body) = rest.split_at(rest.len().min(4));
    let whole = sniff_parts(encoding, &[body]);
    let mut parts = Vec::new();
    let mut remaining = body;
    let mut i = 0;
    while !remaining.is_empty() {
        let size = sizes
            .get(i % sizes.len().max(1))
            .map_or(1, |b| usize::from(*b) + 1);
        let (part, tail) = remaining.split_at(size.min(remaining.len()));
        parts.push(part);
        remaining = tail;
        i += 1;
    }
    let split = sniff_parts(encoding, &parts);
    assert_eq!(whole, split, "{encoding:?}: result depends on the split");
    if let Ok((_, summary)) = &whole {
        check_summary(summary);
    }
}

/// Any summary can be turned into a path or refused, never an unsafe path.
fn check_summary(summary: &DatasetSummary) {
    for naming in [Naming::Hierarchical, Naming::Date, Naming::Flat] {
        if let Ok(named) = naming::relative_path(
            naming,
            summary.study_instance_uid.as_deref(),
            summary.series_instance_uid.as_deref(),
            summary.sop_instance_uid.as_deref(),
            summary.study_date.as_deref(),
            "20240101",
        ) {
            let path = named.path.as_str();
            assert!(!path.starts_with('/') && !path.contains('\\') && !path.contains('\0'));
            assert!(path
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".."));
            // The UID the duplicate decision keys on is the one that names the file.
            let file = path.rsplit('/').next().unwrap_or_default();
            assert_eq!(file.strip_suffix(".dcm"), Some(named.sop_instance_uid));
        }
    }
}

// ---------------------------------------------------------------------------------------
// reassembly
// ---------------------------------------------------------------------------------------

/// What the receiving side does with the data set of the message in flight.
enum Receiving {
    Store(Box<Sniffer>),
    Discard,
}

struct InFlight {
    context_id: u8,
    command: Command,
    receiving: Receiving,
    bytes: u64,
}

/// The association-service state of `service.rs`, over the public API: accepted contexts,
/// the command set being accumulated, the message in flight, and the bytes sent back.
struct Session {
    /// Transfer syntax per accepted presentation context ID.
    contexts: Vec<(u8, &'static str, &'static str)>,
    command: Vec<u8>,
    command_context: Option<u8>,
    inflight: Option<InFlight>,
    peer_max_pdu: u32,
    sent: Vec<u8>,
}

/// Why the association ends.
#[derive(Debug)]
enum End {
    Abort(&'static str),
}

impl Session {
    fn context(&self, id: u8) -> Option<(&'static str, &'static str)> {
        self.contexts
            .iter()
            .find(|(c, _, _)| *c == id)
            .map(|(_, a, t)| (*a, *t))
    }

    fn p_data(&mut self, body: &[u8]) -> Result<(), End> {
        for pdv in pdu::pdvs(body) {
            let pdv = pdv.map_err(|_| End::Abort("malformed PDV"))?;
            if self.context(pdv.context_id).is_none() {
                return Err(End::Abort("context not accepted"));
            }
            if pdv.is_command {
                self.command_fragment(pdv.context_id, pdv.data, pdv.is_last)?;
            } else {
                self.data_fragment(pdv.context_id, pdv.data, pdv.is_last)?;
            }
        }
        Ok(())
    }

    fn command_fragment(&mut self, context_id: u8, data: &[u8], last: bool) -> Result<(), End> {
        if self.inflight.is_some() {
            return Err(End::Abort("command while a data set was expected"));
        }
        if *self.command_context.get_or_insert(context_id) != context_id {
            return Err(End::Abort("command fragments on two contexts"));
        }
        if self.command.len() + data.len() > MAX_COMMAND_SET {
            return Err(End::Abort("command set too large"));
        }
        self.command.extend_from_slice(data);
        assert!(self.command.len() <= MAX_COMMAND_SET);
        if !last {
            return Ok(());
        }
        let parsed = dimse::parse_command(&self.command);
        self.command.clear();
        self.command_context = None;
        let command = parsed.map_err(|_| End::Abort("malformed command set"))?;
        self.dispatch(context_id, command);
        Ok(())
    }

    fn dispatch(&mut self, context_id: u8, command: Command) {
        match command.command_field {
            command_field::C_ECHO_RQ => {
                let rsp = dimse::encode_c_echo_rsp(command.message_id, status::SUCCESS);
                self.respond(context_id, &rsp, &command, status::SUCCESS);
            }
            command_field::C_STORE_RQ if command.has_data_set() => {
                let (_, transfer_syntax) = self.context(context_id).unwrap_or_default();
                let sniffer = Sniffer::validating(Encoding::for_transfer_syntax(transfer_syntax));
                self.inflight = Some(InFlight {
                    context_id,
                    command,
                    receiving: Receiving::Store(Box::new(sniffer)),
                    bytes: 0,
                });
            }
            field if command.has_data_set() && field & 0x8000 == 0 => {
                self.inflight = Some(InFlight {
                    context_id,
                    command,
                    receiving: Receiving::Discard,
                    bytes: 0,
                });
            }
            field if field & 0x8000 != 0 => {}
            _ => {
                let rsp = dimse::encode_failure_rsp(
                    &command,
                    status::UNRECOGNIZED_OPERATION,
                    "this Storage SCP performs only C-STORE and C-ECHO",
                );
                self.respond(context_id, &rsp, &command, status::UNRECOGNIZED_OPERATION);
            }
        }
    }

    fn data_fragment(&mut self, context_id: u8, data: &[u8], last: bool) -> Result<(), End> {
        let Some(inflight) = self.inflight.as_mut() else {
            return Err(End::Abort("data set without a command"));
        };
        if inflight.context_id != context_id {
            return Err(End::Abort("data set on another context"));
        }
        inflight.bytes += data.len() as u64;
        if let Receiving::Store(sniffer) = &mut inflight.receiving {
            if !sniffer.is_done() {
                let _ = sniffer.feed(data);
            }
        }
        if !last {
            return Ok(());
        }
        let Some(done) = self.inflight.take() else {
            return Ok(());
        };
        self.finish(done);
        Ok(())
    }

    fn finish(&mut self, done: InFlight) {
        let command = done.command;
        let (code, comment) = match done.receiving {
            Receiving::Discard => (status::UNRECOGNIZED_OPERATION, "refused".to_string()),
            Receiving::Store(sniffer) => match sniffer.finish() {
                Err(e) => (status::CANNOT_UNDERSTAND, e.to_string()),
                Ok(summary) => {
                    check_summary(&summary);
                    match naming::relative_path(
                        Naming::Hierarchical,
                        summary.study_instance_uid.as_deref(),
                        summary.series_instance_uid.as_deref(),
                        summary.sop_instance_uid.as_deref(),
                        summary.study_date.as_deref(),
                        "20240101",
                    ) {
                        Ok(_) => (status::SUCCESS, String::new()),
                        Err(e) => (status::CANNOT_UNDERSTAND, e.to_string()),
                    }
                }
            },
        };
        let _ = done.bytes;
        if command.command_field == command_field::C_STORE_RQ {
            let rsp = dimse::encode_c_store_rsp(
                command.message_id,
                command
                    .affected_sop_class_uid
                    .as_deref()
                    .unwrap_or_default(),
                command
                    .affected_sop_instance_uid
                    .as_deref()
                    .unwrap_or_default(),
                code,
                (!comment.is_empty()).then_some(comment.as_str()),
            );
            self.respond(done.context_id, &rsp, &command, code);
        } else {
            let rsp = dimse::encode_failure_rsp(&command, code, &comment);
            self.respond(done.context_id, &rsp, &command, code);
        }
    }

    /// Sends a response in P-DATA-TF fragments no larger than the peer's limit, then reads
    /// those fragments back as the peer would.
    fn respond(&mut self, context_id: u8, rsp: &[u8], request: &Command, code: u16) {
        let start = self.sent.len();
        pdu::encode_message_fragments(&mut self.sent, context_id, true, rsp, self.peer_max_pdu);
        let mut rest = self.sent.get(start..).unwrap_or_default();
        let mut message = Vec::new();
        let mut last_seen = false;
        while let Some((header, tail)) = rest.split_first_chunk::<6>() {
            let (kind, len) = pdu::parse_pdu_header(header).expect("our P-DATA-TF header");
            assert_eq!(kind, pdu_type::P_DATA_TF);
            assert!(self.peer_max_pdu == 0 || len <= self.peer_max_pdu);
            let (body, after) = tail.split_at(len as usize);
            for pdv in pdu::pdvs(body) {
                let pdv = pdv.expect("our PDV");
                assert!(!last_seen && pdv.is_command && pdv.context_id == context_id);
                last_seen = pdv.is_last;
                message.extend_from_slice(pdv.data);
            }
            rest = after;
        }
        assert!(last_seen);
        assert_eq!(message, rsp);
        check_response(
            &message,
            request,
            code,
            request.command_field != command_field::C_ECHO_RQ,
        );
    }
}

/// Target `reassembly`: the bytes are the PDU stream a peer sends after association
/// acceptance. Each PDU header is checked and length-limited as the server's reader does;
/// P-DATA-TF bodies go through `pdvs`, command-set accumulation, `parse_command`, and the
/// data set sniffer, as in the association service; responses are encoded and read back.
pub fn reassembly(data: &[u8]) {
    let mut session = Session {
        contexts: vec![
            (1, CT, IMPLICIT),
            (3, CT, EXPLICIT),
            (5, MR, BIG),
            (7, MR, DEFLATED),
            (9, association::VERIFICATION_SOP_CLASS, IMPLICIT),
        ],
        command: Vec::new(),
        command_context: None,
        inflight: None,
        // The peer's limit comes from the first input byte, as a peer's A-ASSOCIATE-RQ
        // would set it: 0 (unlimited) or 7-262.
        peer_max_pdu: match data.first() {
            Some(0) | None => 0,
            Some(b) => u32::from(*b) + 7,
        },
        sent: Vec::new(),
    };
    let mut rest = data.get(1..).unwrap_or_default();
    while let Some((header, tail)) = rest.split_first_chunk::<6>() {
        let Ok((kind, len)) = pdu::parse_pdu_header(header) else {
            return;
        };
        if kind != pdu_type::P_DATA_TF && !matches!(kind, 5 | 7) {
            return; // unexpected PDU: abort
        }
        if pdu::check_pdu_length(kind, len, MAX_PDU).is_err() {
            return;
        }
        let Some((body, after)) = tail.split_at_checked(len as usize) else {
            return; // connection closed mid-PDU
        };
        rest = after;
        match kind {
            pdu_type::P_DATA_TF => {
                if let Err(End::Abort(why)) = session.p_data(body) {
                    let _ = why;
                    return;
                }
            }
            pdu_type::A_ABORT => {
                let _ = pdu::parse_abort(body);
                return;
            }
            _ => return, // A-RELEASE-RQ
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Replays the committed seeds, past findings and any new crash artifacts through
    /// every target.
    #[test]
    fn replay_corpus() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        type Check = fn(&[u8]);
        let targets: [(&str, Check); 5] = [
            ("pdu", super::pdu),
            ("association", super::association),
            ("dimse", super::dimse),
            ("sniff", super::sniff),
            ("reassembly", super::reassembly),
        ];
        let mut count = 0;
        for (name, check) in targets {
            for dir in ["corpus", "regressions", "artifacts"].map(|d| root.join(d).join(name)) {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries {
                    let path = entry.expect("dir entry").path();
                    let bytes = std::fs::read(&path).expect("seed file");
                    eprintln!("{name}: {}", path.display());
                    check(&bytes);
                    count += 1;
                }
            }
        }
        assert!(count > 0, "no seeds found");
    }
}
