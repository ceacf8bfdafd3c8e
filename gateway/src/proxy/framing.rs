//! Response framing for HTTP/1.0 clients.
//!
//! Pingora frames a response body of unknown length as chunked, and for an
//! HTTP/2 upstream it does so after `response_filter`. An HTTP/1.0 client
//! cannot read chunked coding (RFC 9112 §6.1), so this module, which Pingora
//! runs on every response head as it is written, takes `chunked` off for
//! those clients: the body then runs to the connection's close, which
//! `response_filter` asks for. A coding of the upstream's own (`gzip,
//! chunked`) is passed on as it came. It takes the place of Pingora's default
//! downstream module (response compression, disabled), so the modules cost
//! per request what they did.

use std::any::Any;

use async_trait::async_trait;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::{HttpModule, HttpModuleBuilder, Module};
use pingora::Result;

/// Builds [`Http10Framing`] per request.
pub struct Http10FramingBuilder;

impl HttpModuleBuilder for Http10FramingBuilder {
    fn init(&self) -> Module {
        Box::new(Http10Framing { http10: false })
    }
}

/// One request's state: whether its client speaks HTTP/1.0.
pub struct Http10Framing {
    http10: bool,
}

#[async_trait]
impl HttpModule for Http10Framing {
    async fn request_header_filter(&mut self, req: &mut RequestHeader) -> Result<()> {
        self.http10 = req.version == http::Version::HTTP_10;
        Ok(())
    }

    async fn response_header_filter(
        &mut self,
        resp: &mut ResponseHeader,
        _end_of_stream: bool,
    ) -> Result<()> {
        // Only the plain `chunked` Pingora adds: any other coding is the
        // upstream's, and stays as it was.
        if self.http10
            && resp
                .headers
                .get(header::TRANSFER_ENCODING)
                .is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"chunked"))
        {
            resp.remove_header(&header::TRANSFER_ENCODING);
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
