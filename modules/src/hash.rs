//! Content hashes as converge prints and stores them: `sha256:` and lowercase hex.

use sha2::{Digest, Sha256};

/// Lowercase hex of the bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// The SHA-256 of the content as lowercase hex.
pub fn sha256_hex(content: &[u8]) -> String {
    hex(&Sha256::digest(content))
}

/// `sha256:HEX`, the form shown in reports and used as a backup key.
pub fn sha256_id(content: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(content))
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_vector() {
        assert_eq!(super::sha256_id(b"abc"), "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
