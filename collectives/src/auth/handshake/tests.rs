//! The handshake against everything a peer can send: right and wrong secrets, job ids,
//! attempts and ranks, replays, reflections, flipped bits and malformed frames.

use super::*;
use crate::auth::JobSecret;

fn auth(secret: &str, job: &str, attempt: u32) -> JobAuth {
    JobAuth::new(JobSecret::parse(secret).unwrap(), job, attempt)
}

fn job() -> JobAuth {
    auth("the-right-secret-0123456789", "17", 2)
}

const N1: Nonce = [1; NONCE_LEN];
const N2: Nonce = [2; NONCE_LEN];
const N3: Nonce = [3; NONCE_LEN];

fn link_server(auth: Option<&JobAuth>, me: u32) -> Server<'_> {
    Server {
        auth,
        channel: Channel::Link,
        me: Party::Rank(me),
    }
}

fn link_client<'a>(auth: Option<&'a JobAuth>, me: u32, peer: u32, key: &'a str) -> Client<'a> {
    Client {
        auth,
        channel: Channel::Link,
        me: Party::Rank(me),
        peer: Party::Rank(peer),
        key,
    }
}

/// Run a whole exchange through the encoded frames; the server's verdict.
fn run(server: Server<'_>, client: Client<'_>, client_nonce: Nonce, server_nonce: Nonce) -> Result<Accepted, String> {
    let hello = Hello::decode(&client.hello(client_nonce).encode()).map_err(|e| e.to_string())?;
    let (challenge, pending) = server
        .challenge(hello.clone(), server_nonce)
        .map_err(|e| format!("server: {e}"))?;
    let challenge = Challenge::decode(&challenge.encode()).unwrap();
    let proof = client.answer(&hello, &challenge).map_err(|e| format!("client: {e}"))?;
    pending.verify(&proof).map_err(|e| format!("server: {e}"))
}

#[test]
fn matching_parties_accept_each_other() {
    let a = job();
    let got = run(link_server(Some(&a), 1), link_client(Some(&a), 3, 1, "world#1"), N1, N2).unwrap();
    assert_eq!(
        got,
        Accepted {
            client: Party::Rank(3),
            key: "world#1".into()
        }
    );
    let store = Server {
        auth: Some(&a),
        channel: Channel::Store,
        me: Party::Store,
    };
    for me in [Party::Rank(0), Party::Rank(5), Party::Launcher] {
        let client = Client {
            auth: Some(&a),
            channel: Channel::Store,
            me,
            peer: Party::Store,
            key: "",
        };
        assert_eq!(run(store, client, N1, N2).unwrap().client, me);
    }
    // Both without a secret: the same exchange, keyed with nothing.
    assert!(run(link_server(None, 0), link_client(None, 1, 0, "k"), N1, N2).is_ok());
}

#[test]
fn a_different_secret_job_or_attempt_is_refused_by_both_sides() {
    let right = job();
    let wrongs = [
        auth("a-wrong-secret-0123456789", "17", 2),
        auth("the-right-secret-0123456789", "18", 2),
        auth("the-right-secret-0123456789", "", 2),
        auth("the-right-secret-0123456789", "17", 3),
    ];
    for wrong in &wrongs {
        // The client notices a server without the right secret before proving anything.
        let e = run(
            link_server(Some(wrong), 0),
            link_client(Some(&right), 1, 0, "k"),
            N1,
            N2,
        )
        .unwrap_err();
        assert!(e.starts_with("client: the server's proof does not match"), "{e}");
        // A client that forges a proof with what it has is refused by the server.
        let server = link_server(Some(&right), 0);
        let client = link_client(Some(wrong), 1, 0, "k");
        let hello = client.hello(N1);
        let (challenge, pending) = server.challenge(hello.clone(), N2).unwrap();
        let forged = client
            .transcript(&hello, &challenge)
            .mac(Some(wrong), Direction::ClientToServer);
        assert!(matches!(pending.verify(&forged), Err(HandshakeError::BadProof)));
    }
}

#[test]
fn swapped_or_misaddressed_ranks_are_refused() {
    let a = job();
    // A proof made for the pair the other way round.
    let server = link_server(Some(&a), 1);
    let hello = link_client(Some(&a), 2, 1, "k").hello(N1);
    let (challenge, pending) = server.challenge(hello, N2).unwrap();
    let swapped = Transcript {
        channel: Channel::Link,
        client: Party::Rank(1),
        server: Party::Rank(2),
        key: "k".into(),
        client_nonce: N1,
        server_nonce: challenge.nonce,
    };
    assert!(matches!(
        pending.verify(&swapped.mac(Some(&a), Direction::ClientToServer)),
        Err(HandshakeError::BadProof)
    ));
    // Addressed to another rank.
    let e = run(link_server(Some(&a), 1), link_client(Some(&a), 3, 2, "k"), N1, N2).unwrap_err();
    assert!(e.contains("addressed to rank 2, but this is rank 1"), "{e}");
    // Links go from the higher rank to the lower; nobody dials as the store or a launcher.
    for claimed in [Party::Rank(0), Party::Rank(1), Party::Launcher, Party::Store] {
        let client = Client {
            me: claimed,
            ..link_client(Some(&a), 0, 1, "k")
        };
        let e = link_server(Some(&a), 1).challenge(client.hello(N1), N2).unwrap_err();
        assert!(
            matches!(e, HandshakeError::BadClaim(p) if p == claimed),
            "{claimed}: {e}"
        );
    }
    // A key other than the one proven.
    let hello = link_client(Some(&a), 2, 1, "world#1").hello(N1);
    let (challenge, pending) = link_server(Some(&a), 1).challenge(hello.clone(), N2).unwrap();
    let other_key = link_client(Some(&a), 2, 1, "world#2").transcript(&hello, &challenge);
    assert!(
        pending
            .verify(&other_key.mac(Some(&a), Direction::ClientToServer))
            .is_err()
    );
}

#[test]
fn a_replayed_or_reflected_proof_is_refused() {
    let a = job();
    let server = link_server(Some(&a), 0);
    let client = link_client(Some(&a), 1, 0, "k");
    // A recorded, successful exchange.
    let hello = client.hello(N1);
    let (challenge, pending) = server.challenge(hello.clone(), N2).unwrap();
    let recorded = client.answer(&hello, &challenge).unwrap();
    assert!(pending.verify(&recorded).is_ok());
    // The same hello and proof against a fresh server nonce.
    let (_, pending) = server.challenge(hello.clone(), N3).unwrap();
    assert!(matches!(pending.verify(&recorded), Err(HandshakeError::BadProof)));
    // The server's own MAC sent back as the client's proof.
    let (challenge, pending) = server.challenge(hello, N3).unwrap();
    assert!(matches!(pending.verify(&challenge.mac), Err(HandshakeError::BadProof)));
    // A server's answer replayed to a client with a fresh nonce.
    let fresh = client.hello(N3);
    assert!(matches!(
        client.answer(&fresh, &challenge_for(&server, &client.hello(N1), N2)),
        Err(HandshakeError::BadServerProof)
    ));
}

fn challenge_for(server: &Server<'_>, hello: &Hello, nonce: Nonce) -> Challenge {
    server.challenge(hello.clone(), nonce).unwrap().0
}

#[test]
fn every_flipped_bit_of_a_proof_or_challenge_is_refused() {
    let a = job();
    let server = link_server(Some(&a), 0);
    let client = link_client(Some(&a), 1, 0, "k");
    let hello = client.hello(N1);
    let (challenge, _) = server.challenge(hello.clone(), N2).unwrap();
    let proof = client.answer(&hello, &challenge).unwrap();
    for bit in 0..PROOF_LEN * 8 {
        let mut bad = proof;
        bad[bit / 8] ^= 1 << (bit % 8);
        let (_, pending) = server.challenge(hello.clone(), N2).unwrap();
        assert!(
            matches!(pending.verify(&bad), Err(HandshakeError::BadProof)),
            "bit {bit}"
        );
        let mut bad = challenge.clone();
        bad.mac[bit / 8] ^= 1 << (bit % 8);
        assert!(client.answer(&hello, &bad).is_err(), "challenge bit {bit}");
    }
    for len in [0, 1, PROOF_LEN - 1, PROOF_LEN + 1] {
        let (_, pending) = server.challenge(hello.clone(), N2).unwrap();
        let mut wrong_len = proof.to_vec();
        wrong_len.resize(len, 0);
        assert!(pending.verify(&wrong_len).is_err(), "proof of {len} bytes");
    }
}

#[test]
fn every_transcript_field_changes_the_mac() {
    let a = job();
    let base = Transcript {
        channel: Channel::Link,
        client: Party::Rank(2),
        server: Party::Rank(1),
        key: "world#1".into(),
        client_nonce: N1,
        server_nonce: N2,
    };
    let mac = base.mac(Some(&a), Direction::ClientToServer);
    assert_ne!(mac, base.mac(Some(&a), Direction::ServerToClient), "direction");
    assert_ne!(mac, base.mac(None, Direction::ClientToServer), "no secret");
    let variants = [
        Transcript {
            channel: Channel::Store,
            ..base.clone()
        },
        Transcript {
            client: Party::Rank(3),
            ..base.clone()
        },
        Transcript {
            server: Party::Store,
            ..base.clone()
        },
        Transcript {
            key: "world#2".into(),
            ..base.clone()
        },
        Transcript {
            client_nonce: N3,
            ..base.clone()
        },
        Transcript {
            server_nonce: N3,
            ..base.clone()
        },
        // The nonces swapped.
        Transcript {
            client_nonce: N2,
            server_nonce: N1,
            ..base.clone()
        },
    ];
    for (i, v) in variants.iter().enumerate() {
        assert_ne!(mac, v.mac(Some(&a), Direction::ClientToServer), "variant {i}");
    }
    // Job id and attempt are length-delimited: ("1", attempt) never collides with ("", …).
    for other in [
        auth("the-right-secret-0123456789", "1", 2),
        auth("the-right-secret-0123456789", "17", 0),
    ] {
        assert_ne!(mac, base.mac(Some(&other), Direction::ClientToServer));
    }
    assert!(base.verify(Some(&a), Direction::ClientToServer, &mac));
}

#[test]
fn a_peer_without_a_secret_and_a_secure_one_refuse_each_other() {
    let a = job();
    let e = link_server(Some(&a), 0).challenge(link_client(None, 1, 0, "k").hello(N1), N2);
    assert!(matches!(e, Err(HandshakeError::PeerHasNoSecret)));
    let e = link_server(None, 0).challenge(link_client(Some(&a), 1, 0, "k").hello(N1), N2);
    assert!(matches!(e, Err(HandshakeError::NoOwnSecret)));
    // The client checks the challenge's flag too (an insecure server cannot pretend).
    let insecure = link_server(None, 0);
    let (challenge, _) = insecure.challenge(link_client(None, 1, 0, "k").hello(N1), N2).unwrap();
    let secure = link_client(Some(&a), 1, 0, "k");
    assert!(matches!(
        secure.answer(&secure.hello(N1), &challenge),
        Err(HandshakeError::PeerHasNoSecret)
    ));
}

#[test]
fn a_hello_for_another_channel_is_refused() {
    let a = job();
    let store = Server {
        auth: Some(&a),
        channel: Channel::Store,
        me: Party::Store,
    };
    let e = store
        .challenge(link_client(Some(&a), 1, 0, "k").hello(N1), N2)
        .unwrap_err();
    assert!(matches!(e, HandshakeError::WrongChannel { .. }), "{e}");
    let to_store = Client {
        auth: Some(&a),
        channel: Channel::Store,
        me: Party::Rank(1),
        peer: Party::Store,
        key: "",
    };
    let e = link_server(Some(&a), 0).challenge(to_store.hello(N1), N2).unwrap_err();
    assert!(matches!(e, HandshakeError::WrongChannel { .. }), "{e}");
}

#[test]
fn malformed_frames_are_refused_without_panicking() {
    let a = job();
    let good = link_client(Some(&a), 1, 0, "world#1").hello(N1).encode();
    assert_eq!(Hello::decode(&good).unwrap().key, "world#1");
    // Every truncation, and one byte too many.
    for len in 0..good.len() {
        assert!(Hello::decode(&good[..len]).is_err(), "truncated to {len}");
    }
    let mut long = good.clone();
    long.push(0);
    assert!(Hello::decode(&long).is_err());
    // Every corrupted head field.
    let corrupt = |at: usize, value: u8| {
        let mut b = good.clone();
        b[at] = value;
        Hello::decode(&b)
    };
    assert!(corrupt(0, b'X').is_err(), "magic");
    assert!(corrupt(4, 2).is_err(), "version");
    assert!(corrupt(5, 0).is_err() && corrupt(5, 3).is_err(), "channel");
    assert!(corrupt(6, 2).is_err() && corrupt(7, 1).is_err(), "flags");
    // An oversized key length is refused from the head alone, before any key byte is read.
    let mut head = good[..HELLO_HEAD].to_vec();
    head[48..50].copy_from_slice(&(MAX_KEY_LEN as u16 + 1).to_le_bytes());
    assert!(Hello::key_len(&head).is_err());
    head[48..50].copy_from_slice(&u16::MAX.to_le_bytes());
    assert!(Hello::key_len(&head).is_err());
    assert!(Hello::key_len(&head[..HELLO_HEAD - 1]).is_err());
    // A key that is not UTF-8.
    let mut bad_utf8 = good[..HELLO_HEAD].to_vec();
    bad_utf8[48..50].copy_from_slice(&2u16.to_le_bytes());
    bad_utf8.extend_from_slice(&[0xff, 0xfe]);
    assert!(Hello::decode(&bad_utf8).is_err());
    // Plain text and a store request are not handshakes.
    assert!(Hello::key_len(&[b'G'; HELLO_HEAD]).is_err());
    let mut request = vec![1u8, 4, 0, 0, 0];
    request.resize(HELLO_HEAD, 0);
    assert!(Hello::key_len(&request).is_err());

    let challenge = Challenge {
        has_secret: true,
        nonce: N2,
        mac: [9; MAC_LEN],
    };
    let bytes = challenge.encode();
    assert_eq!(Challenge::decode(&bytes).unwrap(), challenge);
    for len in [0, 8, CHALLENGE_LEN - 1, CHALLENGE_LEN + 1] {
        let mut b = bytes.to_vec();
        b.resize(len, 0);
        assert!(Challenge::decode(&b).is_err(), "challenge of {len} bytes");
    }
    for (at, value) in [(0, b'X'), (4, 9), (5, 4), (6, 1), (7, 1)] {
        let mut b = bytes;
        b[at] = value;
        assert!(Challenge::decode(&b).is_err(), "challenge byte {at}");
    }
}

#[test]
fn refusals_name_no_secret() {
    let secret = "the-right-secret-0123456789";
    let errors: Vec<HandshakeError> = vec![
        HandshakeError::BadProof,
        HandshakeError::BadServerProof,
        HandshakeError::Rejected,
        HandshakeError::PeerHasNoSecret,
        HandshakeError::NoOwnSecret,
        Hello::decode(secret.as_bytes()).unwrap_err(),
    ];
    for e in errors {
        assert!(!e.to_string().contains(secret), "{e}");
    }
}
