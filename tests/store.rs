//! The Cassandra repository against the real node.

use std::collections::HashMap;

use caliopen_imap::store::raw_message::raw_message_id;
use uuid::Uuid;

use crate::util::{new_identity, new_user, store};

#[tokio::test]
async fn user_identity_round_trip() {
    let st = store().await;
    let (user, name) = new_user(&st).await;
    assert_eq!(st.user_id_by_name(&name).await.unwrap(), Some(user));
    assert_eq!(
        st.user_name(user).await.unwrap().as_deref(),
        Some(name.as_str())
    );

    let id = new_identity(
        &st,
        user,
        "Alice@Example.test",
        "imap.example.test:993",
        "s3cret",
    )
    .await;
    let back = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert_eq!(back, id);
    assert_eq!(back.identifier, "alice@example.test");

    // The lookup finds it by its (lower-cased) identifier, in any case.
    assert_eq!(
        st.lookup_identity(user, "ALICE@example.TEST")
            .await
            .unwrap(),
        Some(id.identity_id)
    );

    // Map entries are merged, not replaced.
    st.merge_infos(
        user,
        id.identity_id,
        HashMap::from([("lastseenuid".into(), "7".into())]),
    )
    .await
    .unwrap();
    st.remove_infos(user, id.identity_id, &["pollinterval"])
        .await
        .unwrap();
    let back = st.identity(user, id.identity_id).await.unwrap().unwrap();
    assert_eq!(back.info("lastseenuid"), "7");
    assert_eq!(back.info("inserver"), "imap.example.test:993");
    assert_eq!(back.info("pollinterval"), "");

    st.delete_identity(&back).await.unwrap();
    assert!(st.identity(user, id.identity_id).await.unwrap().is_none());
    assert_eq!(
        st.lookup_identity(user, "alice@example.test")
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn sync_lock_is_exclusive() {
    let st = store().await;
    let (u, i) = (Uuid::new_v4(), Uuid::new_v4());
    let now = chrono::Utc::now();
    assert!(st.take_sync_lock(u, i, "w1", now, 3600).await.unwrap());
    assert!(!st.take_sync_lock(u, i, "w2", now, 3600).await.unwrap());
    assert!(
        !st.release_sync_lock(u, i, "w2").await.unwrap(),
        "not its lock"
    );
    assert!(st.release_sync_lock(u, i, "w1").await.unwrap());
    assert!(st.take_sync_lock(u, i, "w2", now, 3600).await.unwrap());
}

#[tokio::test]
async fn raw_message_round_trip() {
    let st = store().await;
    let user = Uuid::new_v4();
    let id = raw_message_id(user, Uuid::new_v4(), "INBOX", 1, 1);
    assert_eq!(st.raw_message_delivered(id).await.unwrap(), None);
    st.insert_raw_message(user, id, b"Subject: x\r\n\r\nbody\xff".to_vec())
        .await
        .unwrap();
    assert_eq!(st.raw_message_delivered(id).await.unwrap(), Some(false));
    st.mark_delivered(id).await.unwrap();
    assert_eq!(st.raw_message_delivered(id).await.unwrap(), Some(true));
    assert_eq!(
        st.raw_message_data(id).await.unwrap().unwrap(),
        b"Subject: x\r\n\r\nbody\xff"
    );
}

#[tokio::test]
async fn unreachable_cassandra_is_one_clear_line() {
    let mut s = caliopen_imap::config::StoreSettings::default();
    s.hosts = vec!["127.0.0.1:1".into()];
    let err = caliopen_imap::store::Store::connect(&s, std::time::Duration::from_secs(5))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with("cannot reach Cassandra at 127.0.0.1:1:"),
        "{err}"
    );
}
