//! The one mapping from a local error to a status code and a short plain reason.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::body::ProxyBody;
use crate::metrics::ErrorKind;

/// veer's own answers to requests it refused for the client's fault (`veer_client_errors_total`),
/// by reason, plain HTTP on a TLS listener among the 400s; shared by every worker. A client
/// that went away mid-body is a client abort instead (`veer_client_aborts_total`), and hyper's
/// own bare answers (a head it cannot read or over twice the limits) are counted nowhere.
#[derive(Debug, Default)]
pub struct ClientErrors([AtomicU64; CLIENT_ERRORS.len()]);

/// The reasons of [`ClientErrors`], with their status, in the order of its counts.
pub const CLIENT_ERRORS: [(&str, u16); 6] = [
    ("bad_request", 400),
    ("no_route", 404),
    ("body_timeout", 408),
    ("body_too_large", 413),
    ("uri_too_long", 414),
    ("headers_too_large", 431),
];

impl ClientErrors {
    /// Counts `error` if it is a refusal for the client's fault.
    pub fn count(&self, error: LocalError) {
        let index = match error {
            LocalError::BadRequest(_) => 0,
            LocalError::NoRoute => 1,
            LocalError::BodyTimeout => 2,
            LocalError::BodyTooLarge => 3,
            LocalError::UriTooLong => 4,
            LocalError::HeadersTooLarge => 5,
            LocalError::BodyAborted | LocalError::NoEndpoint | LocalError::Upstream(_) => return,
        };
        self.0[index].fetch_add(1, Ordering::Relaxed);
    }

    /// `(reason, status, count)` of every reason.
    pub fn counts(&self) -> impl Iterator<Item = (&'static str, u16, u64)> + '_ {
        CLIENT_ERRORS
            .iter()
            .zip(&self.0)
            .map(|(&(reason, status), count)| (reason, status, count.load(Ordering::Relaxed)))
    }
}

/// Whose fault an error was. Only upstream faults count against a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Downstream,
    Upstream,
}

/// An error veer answers itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalError {
    BadRequest(&'static str),
    NoRoute,
    UriTooLong,
    HeadersTooLarge,
    BodyTooLarge,
    BodyTimeout,
    /// The client's request body broke off (it closed or reset mid-body). It is answered
    /// (a half-closed client may still read), and logged as 499: the client went away.
    BodyAborted,
    NoEndpoint,
    Upstream(ErrorKind),
}

impl LocalError {
    pub fn status(self) -> StatusCode {
        match self {
            LocalError::BadRequest(_) | LocalError::BodyAborted => StatusCode::BAD_REQUEST,
            LocalError::NoRoute => StatusCode::NOT_FOUND,
            LocalError::UriTooLong => StatusCode::URI_TOO_LONG,
            LocalError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            LocalError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            LocalError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            LocalError::NoEndpoint | LocalError::Upstream(ErrorKind::Overload) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            LocalError::Upstream(ErrorKind::Timeout) => StatusCode::GATEWAY_TIMEOUT,
            LocalError::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }

    pub fn fault(self) -> Fault {
        match self {
            LocalError::NoEndpoint | LocalError::Upstream(_) => Fault::Upstream,
            _ => Fault::Downstream,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            LocalError::BadRequest(reason) => reason,
            LocalError::NoRoute => "no route for this host and path",
            LocalError::UriTooLong => "request URI too long",
            LocalError::HeadersTooLarge => "request header section too large",
            LocalError::BodyTooLarge => "request body too large",
            LocalError::BodyTimeout => "request body timed out",
            LocalError::BodyAborted => "request body aborted",
            LocalError::NoEndpoint => "no upstream endpoint available",
            LocalError::Upstream(ErrorKind::Connect) => "could not connect to the upstream",
            LocalError::Upstream(ErrorKind::Timeout) => "upstream timed out",
            LocalError::Upstream(ErrorKind::Reset) => "upstream reset the connection",
            LocalError::Upstream(ErrorKind::Protocol) => "upstream sent an invalid response",
            LocalError::Upstream(ErrorKind::Status) => "upstream error",
            LocalError::Upstream(ErrorKind::Overload) => {
                "upstream overloaded: too many requests under way to it"
            }
        }
    }

    /// The response: status, `text/plain` reason, and `Connection: close` for errors after
    /// which the connection's framing cannot be trusted.
    pub fn response(self) -> Response<ProxyBody> {
        let mut body = String::with_capacity(self.reason().len() + 1);
        body.push_str(self.reason());
        body.push('\n');
        let mut response = Response::new(ProxyBody::local(Bytes::from(body)));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if matches!(
            self,
            LocalError::BadRequest(_) | LocalError::BodyTooLarge | LocalError::BodyTimeout
        ) {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_local_error_has_its_status_and_fault() {
        let table = [
            (LocalError::BadRequest("x"), 400, Fault::Downstream),
            (LocalError::NoRoute, 404, Fault::Downstream),
            (LocalError::BodyTimeout, 408, Fault::Downstream),
            (LocalError::BodyTooLarge, 413, Fault::Downstream),
            (LocalError::UriTooLong, 414, Fault::Downstream),
            (LocalError::HeadersTooLarge, 431, Fault::Downstream),
            (
                LocalError::Upstream(ErrorKind::Connect),
                502,
                Fault::Upstream,
            ),
            (LocalError::Upstream(ErrorKind::Reset), 502, Fault::Upstream),
            (
                LocalError::Upstream(ErrorKind::Protocol),
                502,
                Fault::Upstream,
            ),
            (LocalError::NoEndpoint, 503, Fault::Upstream),
            (
                LocalError::Upstream(ErrorKind::Overload),
                503,
                Fault::Upstream,
            ),
            (
                LocalError::Upstream(ErrorKind::Timeout),
                504,
                Fault::Upstream,
            ),
        ];
        for (error, status, fault) in table {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            assert_eq!(error.fault(), fault, "{error:?}");
            assert!(!error.reason().is_empty());
        }
    }

    /// Each refusal for the client's fault is counted once, under its own reason and status;
    /// upstream failures and client aborts are not.
    #[test]
    fn client_errors_count_the_clients_faults_by_reason() {
        let counted = [
            LocalError::BadRequest("x"),
            LocalError::NoRoute,
            LocalError::BodyTimeout,
            LocalError::BodyTooLarge,
            LocalError::UriTooLong,
            LocalError::HeadersTooLarge,
        ];
        for error in counted {
            let errors = ClientErrors::default();
            errors.count(error);
            let counts: Vec<_> = errors.counts().filter(|c| c.2 > 0).collect();
            assert_eq!(counts.len(), 1, "{error:?}");
            assert_eq!(counts[0].1, error.status().as_u16(), "{error:?}");
            assert_eq!(counts[0].2, 1, "{error:?}");
        }
        let errors = ClientErrors::default();
        for error in [
            LocalError::BodyAborted,
            LocalError::NoEndpoint,
            LocalError::Upstream(ErrorKind::Timeout),
            LocalError::Upstream(ErrorKind::Reset),
        ] {
            errors.count(error);
        }
        assert!(errors.counts().all(|c| c.2 == 0));
    }
}
