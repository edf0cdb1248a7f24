//! The server's signing key and key list on a live server: taken in only as a pair that
//! agrees, so no catalog is ever signed by a key the list it carries does not hold.

mod common;
use converge_modules::trust::KeyRole;
use converge_server::keys;

#[test]
fn a_key_list_without_the_key_in_place_waits_for_its_key() {
    let (t, fleet) = common::fleet();
    let dir = t.path().join("state/keys");
    let before = fleet.signing().key_id();
    assert!(!fleet.watch_keys().unwrap(), "nothing changed");
    // Half-way through a rotation: the next list (a new catalog key, the old one retired) is
    // in place, the new key is not yet.
    let root = keys::read_private(&dir.join("root.key")).unwrap();
    let new_id = keys::keygen_one(&dir, "next").unwrap();
    let list = dir.join("trusted-keys.json");
    keys::add(&list, &root, &keys::read_public(&dir.join("next.pub")).unwrap(), KeyRole::Catalog).unwrap();
    keys::retire(&list, &root, &before).unwrap();
    assert!(!fleet.watch_keys().unwrap(), "the pair in force stays");
    assert_eq!(fleet.signing().key_id(), before);
    assert_eq!(fleet.signing().list.version, 1);
    // The key arrives: the pair is taken in.
    std::fs::rename(dir.join("next.key"), dir.join("catalog.key")).unwrap();
    assert!(fleet.watch_keys().unwrap());
    assert_eq!(fleet.signing().key_id(), new_id);
    assert_eq!(fleet.signing().list.version, 3);
}
