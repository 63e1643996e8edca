use graph::{constant_time_eq, MAX_CLIENT_STATE};

#[test]
fn compares_bytes() {
    let secret = "a".repeat(MAX_CLIENT_STATE);
    assert!(constant_time_eq(secret.as_bytes(), secret.as_bytes()));
    let mut other = secret.clone().into_bytes();
    other[MAX_CLIENT_STATE - 1] = b'b';
    assert!(!constant_time_eq(secret.as_bytes(), &other));
    other[MAX_CLIENT_STATE - 1] = b'a';
    other[0] = b'b';
    assert!(!constant_time_eq(secret.as_bytes(), &other));
    assert!(!constant_time_eq(secret.as_bytes(), &other[1..]));
    assert_eq!(MAX_CLIENT_STATE, 128);
}
