//! RFC 3986 byte classes, shared by the request rules ([`crate::route`]) and the allowlist
//! ([`crate::allow`]).

/// RFC 3986's `unreserved` and `sub-delims`, and the `%` of an escape: the bytes any URI
/// component may carry as they are. The request target and `Host` rules add their own.
pub fn uri_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'%'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
        )
}
