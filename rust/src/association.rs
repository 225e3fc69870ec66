//! Association negotiation (PS3.8 7.1, 9.3.2-9.3.4; PS3.7 D.3.3): turns an
//! A-ASSOCIATE-RQ into an A-ASSOCIATE-AC or the A-ASSOCIATE-RJ values of SPEC.md
//! section 3, from an accept table decided once by Python.

use std::collections::HashSet;
use std::net::IpAddr;

use crate::meta::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};
use crate::pdu::{
    presentation_result, reject, AssociateAc, AssociateRq, PresentationContextAc, RoleSelection,
    APPLICATION_CONTEXT_NAME,
};

/// The Verification SOP Class (PS3.4 A.4), always accepted.
pub const VERIFICATION_SOP_CLASS: &str = "1.2.840.10008.1.1";

/// One entry of the calling-AE allow-list: an AE title, optionally bound to a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedCaller {
    pub ae_title: String,
    pub host: Option<IpAddr>,
}

impl AllowedCaller {
    /// Parses "AE" or "AE@address".
    pub fn parse(spec: &str) -> Result<AllowedCaller, String> {
        let (ae, host) = match spec.rsplit_once('@') {
            Some((ae, host)) => {
                let ip = host
                    .trim_matches(['[', ']'])
                    .parse::<IpAddr>()
                    .map_err(|_| format!("invalid host address in allowed caller '{spec}'"))?;
                (ae, Some(ip))
            }
            None => (spec, None),
        };
        let ae = ae.trim();
        if ae.is_empty() || ae.len() > 16 {
            return Err(format!("invalid AE title in allowed caller '{spec}'"));
        }
        Ok(AllowedCaller {
            ae_title: ae.to_string(),
            host,
        })
    }

    fn admits(&self, calling_ae: &str, peer: IpAddr) -> bool {
        self.ae_title == calling_ae && self.host.is_none_or(|h| same_host(h, peer))
    }
}

/// Compares addresses treating an IPv4-mapped IPv6 peer as its IPv4 address.
fn same_host(allowed: IpAddr, peer: IpAddr) -> bool {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    canonical(allowed) == canonical(peer)
}

/// What this SCP accepts, decided at start.
#[derive(Debug, Clone)]
pub struct AcceptPolicy {
    pub ae_title: String,
    pub called_ae_check: bool,
    pub allowed_calling: Vec<AllowedCaller>,
    pub abstract_syntaxes: HashSet<String>,
    pub transfer_syntaxes: HashSet<String>,
    /// Our maximum P-DATA-TF PDU length (receive side), advertised in the AC.
    pub max_pdu_length: u32,
}

/// An accepted presentation context: what the DIMSE layer needs per context ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedContext {
    pub id: u8,
    pub abstract_syntax: String,
    pub transfer_syntax: String,
}

/// The answer to an A-ASSOCIATE-RQ.
#[derive(Debug, Clone)]
pub enum Negotiation {
    Accept {
        ac: AssociateAc,
        contexts: Vec<AcceptedContext>,
    },
    Reject {
        result: u8,
        source: u8,
        reason: u8,
        why: String,
    },
}

/// Decides the A-ASSOCIATE-AC or -RJ for `rq` arriving from `peer`.
///
/// Order of checks: application context (1/1/2), called AE (1/1/7, only when checking
/// is on), calling AE allow-list (1/1/3). Each presentation context is accepted when
/// its abstract syntax is accepted and one proposed transfer syntax is known (the
/// first known one in the requestor's order, since data sets are stored as received);
/// otherwise result 3 or 4.
pub fn negotiate(rq: &AssociateRq, policy: &AcceptPolicy, peer: IpAddr) -> Negotiation {
    let refuse = |reason: u8, why: String| Negotiation::Reject {
        result: reject::RESULT_PERMANENT,
        source: reject::SOURCE_SERVICE_USER,
        reason,
        why,
    };
    if rq.application_context != APPLICATION_CONTEXT_NAME {
        return refuse(
            reject::USER_APPLICATION_CONTEXT_NOT_SUPPORTED,
            format!(
                "application context '{}' not supported",
                rq.application_context
            ),
        );
    }
    if policy.called_ae_check && rq.called_ae != policy.ae_title {
        return refuse(
            reject::USER_CALLED_AE_NOT_RECOGNIZED,
            format!("called AE title '{}' not recognized", rq.called_ae),
        );
    }
    if !policy.allowed_calling.is_empty()
        && !policy
            .allowed_calling
            .iter()
            .any(|a| a.admits(&rq.calling_ae, peer))
    {
        return refuse(
            reject::USER_CALLING_AE_NOT_RECOGNIZED,
            format!(
                "calling AE title '{}' from {peer} not allowed",
                rq.calling_ae
            ),
        );
    }

    let mut results = Vec::with_capacity(rq.presentation_contexts.len());
    let mut contexts = Vec::new();
    for pc in &rq.presentation_contexts {
        let accepted_syntax = pc.abstract_syntax == VERIFICATION_SOP_CLASS
            || policy.abstract_syntaxes.contains(&pc.abstract_syntax);
        let transfer = pc
            .transfer_syntaxes
            .iter()
            .find(|ts| policy.transfer_syntaxes.contains(ts.as_str()));
        let (result, transfer_syntax) = match (accepted_syntax, transfer) {
            (false, _) => (
                presentation_result::ABSTRACT_SYNTAX_NOT_SUPPORTED,
                String::new(),
            ),
            (true, None) => (
                presentation_result::TRANSFER_SYNTAXES_NOT_SUPPORTED,
                String::new(),
            ),
            (true, Some(ts)) => {
                contexts.push(AcceptedContext {
                    id: pc.id,
                    abstract_syntax: pc.abstract_syntax.clone(),
                    transfer_syntax: ts.clone(),
                });
                (presentation_result::ACCEPTANCE, ts.clone())
            }
        };
        results.push(PresentationContextAc {
            id: pc.id,
            result,
            transfer_syntax,
        });
    }

    // SCP/SCU role selection (PS3.7 D.3.3.4): the requestor may only be an SCU here. Only
    // classes of an accepted context are answered, each once: an answer for anything else
    // means nothing, and echoing every item of a hostile RQ would overflow the User
    // Information Item's 16-bit length.
    let mut role_selections: Vec<RoleSelection> = Vec::new();
    for r in &rq.user_info.role_selections {
        let accepted = contexts
            .iter()
            .any(|c| c.abstract_syntax == r.sop_class_uid);
        if accepted
            && !role_selections
                .iter()
                .any(|s| s.sop_class_uid == r.sop_class_uid)
        {
            role_selections.push(RoleSelection {
                sop_class_uid: r.sop_class_uid.clone(),
                scu_role: r.scu_role,
                scp_role: false,
            });
        }
    }

    Negotiation::Accept {
        ac: AssociateAc {
            called_ae: rq.called_ae.clone(),
            calling_ae: rq.calling_ae.clone(),
            application_context: APPLICATION_CONTEXT_NAME.to_string(),
            presentation_contexts: results,
            max_pdu_length: policy.max_pdu_length,
            implementation_class_uid: IMPLEMENTATION_CLASS_UID.to_string(),
            implementation_version_name: IMPLEMENTATION_VERSION_NAME.to_string(),
            // Operations are performed synchronously (PS3.7 D.3.3.3): window (1, 1).
            async_ops_window: rq.user_info.async_ops_window.map(|_| (1, 1)),
            role_selections,
        },
        contexts,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::pdu::{PresentationContextRq, UserInformation};

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
    const IMPLICIT: &str = "1.2.840.10008.1.2";
    const EXPLICIT: &str = "1.2.840.10008.1.2.1";

    fn policy() -> AcceptPolicy {
        AcceptPolicy {
            ae_title: "PACS".into(),
            called_ae_check: false,
            allowed_calling: vec![],
            abstract_syntaxes: [CT.to_string()].into(),
            transfer_syntaxes: [IMPLICIT.to_string(), EXPLICIT.to_string()].into(),
            max_pdu_length: 65536,
        }
    }

    fn rq(contexts: Vec<(u8, &str, Vec<&str>)>) -> AssociateRq {
        AssociateRq {
            protocol_version: 1,
            called_ae: "PACS".into(),
            calling_ae: "MODALITY".into(),
            application_context: APPLICATION_CONTEXT_NAME.into(),
            presentation_contexts: contexts
                .into_iter()
                .map(|(id, a, ts)| PresentationContextRq {
                    id,
                    abstract_syntax: a.into(),
                    transfer_syntaxes: ts.into_iter().map(String::from).collect(),
                })
                .collect(),
            user_info: UserInformation {
                async_ops_window: Some((5, 5)),
                ..UserInformation::default()
            },
        }
    }

    fn peer() -> IpAddr {
        "127.0.0.1".parse().unwrap()
    }

    #[test]
    fn per_context_results() {
        let req = rq(vec![
            (1, CT, vec!["1.2.3.4", EXPLICIT]),
            (3, MR, vec![IMPLICIT]),
            (5, CT, vec!["1.2.3.4"]),
            (7, VERIFICATION_SOP_CLASS, vec![IMPLICIT]),
        ]);
        let Negotiation::Accept { ac, contexts } = negotiate(&req, &policy(), peer()) else {
            panic!("rejected");
        };
        let results: Vec<(u8, u8)> = ac
            .presentation_contexts
            .iter()
            .map(|p| (p.id, p.result))
            .collect();
        assert_eq!(results, [(1, 0), (3, 3), (5, 4), (7, 0)]);
        assert_eq!(contexts.len(), 2);
        assert_eq!(contexts[0].transfer_syntax, EXPLICIT);
        assert_eq!(ac.async_ops_window, Some((1, 1)));
        assert_eq!(ac.max_pdu_length, 65536);
    }

    #[test]
    fn rejections() {
        let mut req = rq(vec![(1, CT, vec![IMPLICIT])]);
        req.application_context = "1.2.3".into();
        assert!(matches!(
            negotiate(&req, &policy(), peer()),
            Negotiation::Reject {
                result: 1,
                source: 1,
                reason: 2,
                ..
            }
        ));

        let req = rq(vec![(1, CT, vec![IMPLICIT])]);
        let mut p = policy();
        p.ae_title = "OTHER".into();
        assert!(matches!(
            negotiate(&req, &p, peer()),
            Negotiation::Accept { .. }
        ));
        p.called_ae_check = true;
        assert!(matches!(
            negotiate(&req, &p, peer()),
            Negotiation::Reject { reason: 7, .. }
        ));

        let mut p = policy();
        p.allowed_calling = vec![AllowedCaller::parse("MODALITY@10.0.0.1").unwrap()];
        assert!(matches!(
            negotiate(&req, &p, peer()),
            Negotiation::Reject { reason: 3, .. }
        ));
        p.allowed_calling = vec![AllowedCaller::parse("MODALITY@127.0.0.1").unwrap()];
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(matches!(
            negotiate(&req, &p, mapped),
            Negotiation::Accept { .. }
        ));
    }

    #[test]
    fn role_selection_answered_once_per_accepted_class() {
        let mut req = rq(vec![(1, CT, vec![IMPLICIT]), (3, MR, vec![IMPLICIT])]);
        let role = |uid: &str| RoleSelection {
            sop_class_uid: uid.into(),
            scu_role: true,
            scp_role: true,
        };
        req.user_info.role_selections = vec![role(CT), role(MR), role(CT)];
        let Negotiation::Accept { ac, .. } = negotiate(&req, &policy(), peer()) else {
            panic!("rejected");
        };
        assert_eq!(
            ac.role_selections,
            [RoleSelection {
                sop_class_uid: CT.into(),
                scu_role: true,
                scp_role: false,
            }]
        );
    }

    #[test]
    fn allowed_caller_parsing() {
        assert_eq!(
            AllowedCaller::parse("CT1").unwrap(),
            AllowedCaller {
                ae_title: "CT1".into(),
                host: None
            }
        );
        assert!(AllowedCaller::parse("CT1@[::1]").unwrap().host.is_some());
        assert!(AllowedCaller::parse("CT1@nohost").is_err());
        assert!(AllowedCaller::parse("").is_err());
        assert!(AllowedCaller::parse("ABCDEFGHIJKLMNOPQ").is_err());
    }
}
