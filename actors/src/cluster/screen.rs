//! What a peer's membership packet may tell this node, checked before foca reads it. foca
//! applies every member update in a packet from a member it considers alive, and the peer's
//! certificate vouches only for the header's sender. Members do learn other members' identities
//! and renewed generations through gossip, so third-party updates stay; but a packet naming a
//! generation implausibly far ahead of this node's clock is refused whole (a wire fault: one such
//! `alive` would give a member an identity its node can never outbid, shutting it out), a packet
//! never grows the member table past its cap (a flood of made-up nodes would each get a registry
//! entry, a relay actor and a datagram sender), and metadata is taken only for members. Pure:
//! the caller passes the clock, what it knows and the cap; nothing here touches foca.

use std::collections::HashSet;
use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;

use super::identity::NodeIdentity;
use super::meta::MAX_META_BYTES;
use super::ports::{MembershipCodec, WireFault};
use crate::ids::NodeId;

/// How far ahead of this node's clock a generation may be. A generation is its node's start
/// time in microseconds (or one more than the highest it used before, when its clock stepped
/// back), so a real one is ahead only by the clocks' difference; a day leaves room for badly set
/// clocks while bounding how long a forged one can shut a member out.
pub const MAX_GENERATION_LEAD: Duration = Duration::from_secs(24 * 60 * 60);

/// Distinct members (node ids, down ones included until foca forgets them) a node tracks at
/// most. Past it, packets are screened so that no new node id reaches foca (a sender new past
/// it is not heard at all), logged and counted (`troupe_cluster_members_refused_total`).
pub const MAX_MEMBERS: usize = 1024;

/// The inputs of one screening.
pub(crate) struct Screen<'a> {
    /// The membership's wire format.
    pub(crate) codec: &'a dyn MembershipCodec,
    /// This node (its own node id is never a new member).
    pub(crate) me: &'a NodeId,
    /// This node's clock, in microseconds since the epoch.
    pub(crate) now_micros: u64,
    /// Members foca tracks now.
    pub(crate) tracked: usize,
    /// At most this many members ([`MAX_MEMBERS`]).
    pub(crate) max_members: usize,
}

/// What to do with a packet.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Hand `bytes` to foca: the packet itself, or a copy without the member updates and
    /// metadata of the nodes in `refused` (new past the cap) and `unknown_meta` (metadata of
    /// nodes that are not members).
    Pass {
        bytes: Bytes,
        refused: Vec<NodeId>,
        unknown_meta: Vec<NodeId>,
    },
    /// The sender broke the protocol: refuse the whole packet.
    Fault(WireFault, String),
    /// The sender is a new member past the cap (so are the others in `refused`): drop the
    /// packet; foca cannot hear a sender without taking it as a member.
    SenderRefused { refused: Vec<NodeId> },
    /// An indirect probe's message (a ping request, an indirect ping or ack, a forwarded ack)
    /// names `about`, a node this node does not track: drop the packet. foca would send to it
    /// (and the transport keep a sender for it) without ever taking it as a member, so nothing
    /// would ever forget it; a real member missing here only fails one indirect probe, which
    /// the others of its round cover.
    UnknownTarget { about: NodeId },
}

impl Screen<'_> {
    /// The highest generation taken.
    fn latest_generation(&self) -> u64 {
        let lead = u64::try_from(MAX_GENERATION_LEAD.as_micros()).unwrap_or(u64::MAX);
        self.now_micros.saturating_add(lead)
    }

    fn check_generation(&self, what: &str, node: &NodeId, generation: u64) -> Result<(), Verdict> {
        if generation <= self.latest_generation() {
            return Ok(());
        }
        let ahead = Duration::from_micros(generation.saturating_sub(self.now_micros));
        Err(Verdict::Fault(
            WireFault::FutureGeneration,
            format!(
                "{what} names node {node} with generation {generation}, {} h ahead of this \
                 node's clock (a generation is its node's start time in microseconds; at most \
                 {} h ahead is taken): check the clocks of both nodes",
                ahead.as_secs() / 3600,
                MAX_GENERATION_LEAD.as_secs() / 3600
            ),
        ))
    }

    fn check_identity(&self, what: &str, identity: &NodeIdentity) -> Result<(), Verdict> {
        self.check_generation(what, &identity.node, identity.generation)
    }

    /// Screens the packet `from` sent; `known` tells the node ids foca tracks.
    pub(crate) fn check(
        &self,
        from: &NodeId,
        bytes: &Bytes,
        known: impl Fn(&NodeId) -> bool,
    ) -> Verdict {
        match self.screen(from, bytes, known) {
            Ok(verdict) | Err(verdict) => verdict,
        }
    }

    fn screen(
        &self,
        from: &NodeId,
        bytes: &Bytes,
        known: impl Fn(&NodeId) -> bool,
    ) -> Result<Verdict, Verdict> {
        let malformed = |detail: String| Verdict::Fault(WireFault::MalformedDatagram, detail);
        let (header, used) = self
            .codec
            .decode_header(bytes)
            .map_err(|error| malformed(error.to_string()))?;
        if header.src.node != *from {
            return Err(Verdict::Fault(
                WireFault::SpoofedDatagram,
                format!(
                    "the header names node {} but the certificate names {from}",
                    header.src.node
                ),
            ));
        }
        self.check_identity("the header's sender", &header.src)?;
        self.check_identity("the header's destination", &header.dst)?;
        match &header.message {
            foca::Message::PingReq { target, .. } | foca::Message::IndirectAck { target, .. } => {
                self.check_identity("the message's target", target)?;
            }
            foca::Message::IndirectPing { origin, .. }
            | foca::Message::ForwardedAck { origin, .. } => {
                self.check_identity("the message's origin", origin)?;
            }
            _ => {}
        }

        // Node ids new to this node, in the order the packet names them, and how many of them
        // the cap leaves room for.
        let mut room = self.max_members.saturating_sub(self.tracked);
        let mut taken: HashSet<NodeId> = HashSet::new();
        let mut refused: Vec<NodeId> = Vec::new();
        let mut admit = |node: &NodeId| -> bool {
            if node == self.me || known(node) || taken.contains(node) {
                return true;
            }
            if refused.contains(node) {
                return false;
            }
            if room > 0 {
                room -= 1;
                taken.insert(node.clone());
                true
            } else {
                refused.push(node.clone());
                false
            }
        };
        let sender_admitted = admit(&header.src.node);
        let target = match &header.message {
            foca::Message::PingReq { target, .. } | foca::Message::IndirectAck { target, .. } => {
                Some(&target.node)
            }
            foca::Message::IndirectPing { origin, .. }
            | foca::Message::ForwardedAck { origin, .. } => Some(&origin.node),
            _ => None,
        };

        // foca's layout: the header, then (except in a Broadcast) a u16 count and that many
        // members, then custom broadcasts (metadata), each a u16 length and the item.
        let mut members: Vec<(Range<usize>, bool)> = Vec::new();
        let mut count_at = None;
        let mut at = used;
        if bytes.len() - used >= 2 && header.message != foca::Message::Broadcast {
            count_at = Some(used);
            let count = u16::from_be_bytes([bytes[used], bytes[used + 1]]);
            at += 2;
            for _ in 0..count {
                let (member, length) = self
                    .codec
                    .decode_member(&bytes[at..])
                    .map_err(|error| malformed(error.to_string()))?;
                if length == 0 || length > bytes.len() - at {
                    return Err(malformed(format!(
                        "a member said to take {length} bytes of the {} left",
                        bytes.len() - at
                    )));
                }
                self.check_identity("a member update", member.id())?;
                let keep = admit(&member.id().node);
                members.push((at..at + length, keep));
                at += length;
            }
        }
        let members_end = at;

        let mut items: Vec<(Range<usize>, bool)> = Vec::new();
        let mut unknown_meta: Vec<NodeId> = Vec::new();
        while bytes.len() - at > 2 {
            let length = usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]]));
            if length == 0 || length > bytes.len() - at - 2 {
                // Broken framing: foca refuses the packet as malformed.
                break;
            }
            let item = at + 2..at + 2 + length;
            let mut keep = true;
            // One over the cap or that does not decode is left to foca's handler, which
            // refuses it with the reason.
            if length <= MAX_META_BYTES
                && let Ok(meta) = self.codec.decode_meta(&bytes[item.clone()])
            {
                self.check_generation("node metadata", &meta.node, meta.generation)?;
                keep = meta.node == *self.me || known(&meta.node) || taken.contains(&meta.node);
                if !keep {
                    unknown_meta.push(meta.node);
                }
            }
            items.push((at..item.end, keep));
            at = item.end;
        }

        if !sender_admitted {
            return Ok(Verdict::SenderRefused { refused });
        }
        // The members of this very packet count: foca applies them before it acts on the
        // message.
        if let Some(about) = target
            && !(about == self.me || known(about) || taken.contains(about))
        {
            return Ok(Verdict::UnknownTarget {
                about: about.clone(),
            });
        }
        let stripped = members.iter().chain(&items).any(|(_, keep)| !keep);
        if !stripped {
            return Ok(Verdict::Pass {
                bytes: bytes.clone(),
                refused,
                unknown_meta,
            });
        }
        let mut kept = Vec::with_capacity(bytes.len());
        match count_at {
            Some(count_at) => {
                kept.extend_from_slice(&bytes[..count_at]);
                let count = members.iter().filter(|(_, keep)| *keep).count();
                let count = u16::try_from(count).expect("at most the u16 count read");
                kept.extend_from_slice(&count.to_be_bytes());
                for (range, _) in members.iter().filter(|(_, keep)| *keep) {
                    kept.extend_from_slice(&bytes[range.clone()]);
                }
            }
            None => kept.extend_from_slice(&bytes[..members_end]),
        }
        for (range, _) in items.iter().filter(|(_, keep)| *keep) {
            kept.extend_from_slice(&bytes[range.clone()]);
        }
        kept.extend_from_slice(&bytes[at..]);
        Ok(Verdict::Pass {
            bytes: Bytes::from(kept),
            refused,
            unknown_meta,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::cluster::meta::{META_FORMAT, NodeLoad, NodeMeta};
    use crate::cluster::ports::CodecError;

    /// JSON, as the actor crate's tests speak it (the node uses its wire codec).
    struct Json;

    fn prefix<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), CodecError> {
        let mut values = serde_json::Deserializer::from_slice(bytes).into_iter::<T>();
        let value = values
            .next()
            .ok_or_else(|| CodecError("empty".into()))?
            .map_err(|error| CodecError(error.to_string()))?;
        Ok((value, values.byte_offset()))
    }

    impl MembershipCodec for Json {
        fn encode_header(
            &self,
            header: &foca::Header<NodeIdentity>,
        ) -> Result<Vec<u8>, CodecError> {
            Ok(serde_json::to_vec(header).unwrap())
        }
        fn decode_header(
            &self,
            bytes: &[u8],
        ) -> Result<(foca::Header<NodeIdentity>, usize), CodecError> {
            prefix(bytes)
        }
        fn encode_member(
            &self,
            member: &foca::Member<NodeIdentity>,
        ) -> Result<Vec<u8>, CodecError> {
            Ok(serde_json::to_vec(member).unwrap())
        }
        fn decode_member(
            &self,
            bytes: &[u8],
        ) -> Result<(foca::Member<NodeIdentity>, usize), CodecError> {
            prefix(bytes)
        }
        fn encode_meta(&self, meta: &NodeMeta) -> Result<Vec<u8>, CodecError> {
            Ok(serde_json::to_vec(meta).unwrap())
        }
        fn decode_meta(&self, bytes: &[u8]) -> Result<NodeMeta, CodecError> {
            serde_json::from_slice(bytes).map_err(|error| CodecError(error.to_string()))
        }
    }

    const NOW: u64 = 1_800_000_000_000_000;
    const HOUR: u64 = 3_600_000_000;

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn identity(name: &str, generation: u64) -> NodeIdentity {
        NodeIdentity {
            node: node(name),
            addr: "10.0.0.1:7000".parse().unwrap(),
            generation,
        }
    }

    fn meta(name: &str, generation: u64) -> NodeMeta {
        NodeMeta {
            format: META_FORMAT,
            node: node(name),
            generation,
            version: 1,
            http: None,
            load: NodeLoad::default(),
            labels: BTreeMap::new(),
            providers: Vec::new(),
            leaving: false,
            truncated: false,
        }
    }

    /// A packet from `b` to `a` as foca lays it out.
    fn packet(
        message: foca::Message<NodeIdentity>,
        members: &[foca::Member<NodeIdentity>],
        metas: &[NodeMeta],
    ) -> Bytes {
        let header = foca::Header {
            src: identity("b", NOW),
            src_incarnation: 0,
            dst: identity("a", NOW),
            message,
        };
        let mut bytes = Json.encode_header(&header).unwrap();
        bytes.extend(u16::try_from(members.len()).unwrap().to_be_bytes());
        for member in members {
            bytes.extend(Json.encode_member(member).unwrap());
        }
        for meta in metas {
            let item = Json.encode_meta(meta).unwrap();
            bytes.extend(u16::try_from(item.len()).unwrap().to_be_bytes());
            bytes.extend(item);
        }
        Bytes::from(bytes)
    }

    fn screen(tracked: usize, max_members: usize) -> Screen<'static> {
        static ME: std::sync::LazyLock<NodeId> = std::sync::LazyLock::new(|| node("a"));
        Screen {
            codec: &Json,
            me: &ME,
            now_micros: NOW,
            tracked,
            max_members,
        }
    }

    fn known(node: &NodeId) -> bool {
        matches!(node.as_str(), "b" | "c")
    }

    #[test]
    fn a_generation_more_than_a_day_ahead_is_refused_wherever_the_packet_names_it() {
        let ahead = |hours: u64| NOW + hours * HOUR;
        let screen = screen(2, MAX_MEMBERS);
        let alive = |generation| foca::Member::alive(identity("c", generation));
        let gossip = foca::Message::Gossip;
        // Within a day: a clock a little ahead, or a generation taken above the last one.
        let fine = packet(gossip.clone(), &[alive(ahead(23))], &[meta("c", ahead(23))]);
        assert!(matches!(
            screen.check(&node("b"), &fine, known),
            Verdict::Pass { ref bytes, .. } if *bytes == fine
        ));
        let refused = [
            packet(gossip.clone(), &[alive(u64::MAX)], &[]),
            packet(gossip.clone(), &[alive(ahead(25))], &[]),
            packet(
                foca::Message::PingReq {
                    target: identity("c", u64::MAX),
                    probe_number: 1,
                },
                &[],
                &[],
            ),
            packet(gossip, &[], &[meta("c", u64::MAX)]),
        ];
        for bytes in refused {
            match screen.check(&node("b"), &bytes, known) {
                Verdict::Fault(WireFault::FutureGeneration, detail) => {
                    assert!(detail.contains("node c"), "{detail}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn past_the_cap_new_members_are_left_out_and_the_rest_goes_through() {
        // a tracks b and c; room for one more.
        let screen = screen(2, 3);
        let members = [
            foca::Member::alive(identity("c", NOW)),
            foca::Member::alive(identity("d", NOW)),
            foca::Member::alive(identity("e", NOW)),
            foca::Member::down(identity("f", NOW)),
            foca::Member::alive(identity("d", NOW + 1)),
        ];
        let metas = [
            meta("d", NOW),
            meta("e", NOW),
            meta("c", NOW),
            meta("a", NOW),
        ];
        let bytes = packet(foca::Message::Ping(1), &members, &metas);
        let Verdict::Pass {
            bytes: kept,
            refused,
            unknown_meta,
        } = screen.check(&node("b"), &bytes, known)
        else {
            panic!("the packet goes through");
        };
        assert_eq!(refused, [node("e"), node("f")]);
        assert_eq!(unknown_meta, [node("e")]);
        let expected = packet(
            foca::Message::Ping(1),
            &[members[0].clone(), members[1].clone(), members[4].clone()],
            &[meta("d", NOW), meta("c", NOW), meta("a", NOW)],
        );
        assert_eq!(kept, expected, "what is left is laid out as foca reads it");
    }

    #[test]
    fn a_new_sender_past_the_cap_is_not_heard() {
        let bytes = packet(foca::Message::Announce, &[], &[]);
        let bytes = bytes.slice(..bytes.len() - 2);
        assert_eq!(
            screen(3, 3).check(&node("b"), &bytes, |_| false),
            Verdict::SenderRefused {
                refused: vec![node("b")]
            }
        );
        assert!(matches!(
            screen(2, 3).check(&node("b"), &bytes, |_| false),
            Verdict::Pass { .. }
        ));
    }

    #[test]
    fn metadata_of_a_node_that_is_not_a_member_is_left_out_even_in_a_broadcast() {
        let header = foca::Header {
            src: identity("b", NOW),
            src_incarnation: 0,
            dst: identity("a", NOW),
            message: foca::Message::Broadcast,
        };
        let with = |metas: &[NodeMeta]| {
            let mut bytes = Json.encode_header(&header).unwrap();
            for meta in metas {
                let item = Json.encode_meta(meta).unwrap();
                bytes.extend(u16::try_from(item.len()).unwrap().to_be_bytes());
                bytes.extend(item);
            }
            Bytes::from(bytes)
        };
        let bytes = with(&[meta("x", NOW), meta("c", NOW)]);
        let Verdict::Pass {
            bytes: kept,
            unknown_meta,
            ..
        } = screen(2, MAX_MEMBERS).check(&node("b"), &bytes, known)
        else {
            panic!("the packet goes through");
        };
        assert_eq!(unknown_meta, [node("x")]);
        assert_eq!(kept, with(&[meta("c", NOW)]));
    }

    /// A ping request about a made-up node made foca send to it, and the transport keep a
    /// datagram sender for it that nothing would ever forget (it never becomes a member).
    #[test]
    fn an_indirect_probe_about_a_node_that_is_not_tracked_is_ignored() {
        let request = |target: &str| foca::Message::PingReq {
            target: identity(target, NOW),
            probe_number: 1,
        };
        let screen = screen(2, MAX_MEMBERS);
        assert_eq!(
            screen.check(&node("b"), &packet(request("made-up"), &[], &[]), known),
            Verdict::UnknownTarget {
                about: node("made-up")
            }
        );
        for bytes in [
            packet(request("c"), &[], &[]),
            // Learnt from the same packet.
            packet(
                request("d"),
                &[foca::Member::alive(identity("d", NOW))],
                &[],
            ),
        ] {
            assert!(matches!(
                screen.check(&node("b"), &bytes, known),
                Verdict::Pass { .. }
            ));
        }
        let origin = foca::Message::IndirectPing {
            origin: identity("made-up", NOW),
            probe_number: 1,
        };
        assert!(matches!(
            screen.check(&node("b"), &packet(origin, &[], &[]), known),
            Verdict::UnknownTarget { .. }
        ));
    }

    #[test]
    fn a_header_naming_another_node_than_the_certificate_is_spoofed() {
        let bytes = packet(foca::Message::Gossip, &[], &[]);
        assert!(matches!(
            screen(2, MAX_MEMBERS).check(&node("c"), &bytes, known),
            Verdict::Fault(WireFault::SpoofedDatagram, _)
        ));
    }
}
