//! List pagination: `GET /api/v1/<kind>?limit=N` answers a page sorted by name and a `continue`
//! token; `?limit=N&continue=TOKEN` the next one. Every page after the first is read at the
//! first page's etcd revision, so the pages together are one snapshot (an object created
//! between two pages is in none of them); once etcd has compacted that revision the next page
//! is 410 Gone and the client lists again from the start.

use super::error::ApiError;

/// The largest page a client may ask for.
pub const MAX_LIMIT: usize = 1000;

/// Where a page starts.
#[derive(Debug, PartialEq, Eq)]
pub struct Cursor {
    /// The snapshot's revision.
    pub revision: i64,
    /// The last name of the previous page.
    pub after: String,
}

/// What a list request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum ListQuery {
    /// Everything at once (no `limit`).
    All,
    /// A page of `limit`, from the start or from a cursor.
    Page { limit: usize, from: Option<Cursor> },
}

/// The token of the page after `after` in the snapshot at `revision`: opaque to clients (hex of
/// `REVISION/NAME`, since names are DNS labels and revisions numbers).
pub fn token(revision: i64, after: &str) -> String {
    format!("{revision}/{after}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn bad_token() -> ApiError {
    ApiError::bad_request("query parameter continue: not a token this server gave out")
}

fn parse_token(text: &str) -> Result<Cursor, ApiError> {
    if text.len() % 2 != 0 || text.len() > 400 {
        return Err(bad_token());
    }
    let bytes = (0..text.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(text.get(i..i + 2).ok_or_else(bad_token)?, 16)
                .map_err(|_| bad_token())
        })
        .collect::<Result<Vec<u8>, ApiError>>()?;
    let text = String::from_utf8(bytes).map_err(|_| bad_token())?;
    let (revision, after) = text.split_once('/').ok_or_else(bad_token)?;
    let revision: i64 = revision.parse().map_err(|_| bad_token())?;
    if revision <= 0 || crate::model::validate::dns_label("continue", after).is_err() {
        return Err(bad_token());
    }
    Ok(Cursor {
        revision,
        after: after.to_string(),
    })
}

/// Reads `limit` and `continue` from a list request's query.
pub fn parse(query: Option<&str>) -> Result<ListQuery, ApiError> {
    let mut limit = None;
    let mut from = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("limit", v)) => match v.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => limit = Some(n),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "query parameter limit: {v:?} is not a number from 1 to {MAX_LIMIT}"
                    )))
                }
            },
            Some(("continue", v)) => from = Some(parse_token(v)?),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {pair:?}: only limit and continue are accepted"
                )))
            }
        }
    }
    match (limit, from) {
        (None, None) => Ok(ListQuery::All),
        (None, Some(_)) => Err(ApiError::bad_request(
            "query parameter continue needs limit too",
        )),
        (Some(limit), from) => Ok(ListQuery::Page { limit, from }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_nonsense_is_refused() {
        let t = token(42, "web-1");
        assert_eq!(
            parse(Some(&format!("limit=10&continue={t}"))).unwrap(),
            ListQuery::Page {
                limit: 10,
                from: Some(Cursor {
                    revision: 42,
                    after: "web-1".into()
                })
            }
        );
        assert_eq!(parse(None).unwrap(), ListQuery::All);
        assert_eq!(
            parse(Some("limit=1000")).unwrap(),
            ListQuery::Page {
                limit: 1000,
                from: None
            }
        );
        for bad in [
            "limit=0",
            "limit=1001",
            "limit=x",
            "limit=5&continue=zz",
            "limit=5&continue=abc",
            &format!("continue={t}"),
            &format!("limit=5&continue={}", token(0, "a")),
            &format!("limit=5&continue={}", token(5, "Not A Name")),
            "limit=5&sort=name",
        ] {
            assert!(parse(Some(bad)).is_err(), "{bad}");
        }
    }
}
