//! Names for the bounds the request path puts on its parts, so that every
//! internal function states them once.

use http::{Request, Response};
use http_body::Body;
use redis::aio::ConnectionLike;
use tower_service::Service;

/// An inner service whose fills can run as their own tasks.
pub(crate) trait Inner<ReqB, ResB>:
    Service<Request<ReqB>, Response = Response<ResB>, Future: Send + 'static, Error: Send + 'static>
    + Send
    + 'static
{
}

impl<T, ReqB, ResB> Inner<ReqB, ResB> for T where
    T: Service<
            Request<ReqB>,
            Response = Response<ResB>,
            Future: Send + 'static,
            Error: Send + 'static,
        > + Send
        + 'static
{
}

/// A response body that can be buffered in one task and sent to another.
pub(crate) trait CacheBody:
    Body<Data: Send, Error: Send + 'static> + Send + 'static
{
}

impl<B> CacheBody for B where B: Body<Data: Send, Error: Send + 'static> + Send + 'static {}

/// A Redis connection the cache can clone into every call.
pub(crate) trait Conn: ConnectionLike + Clone + Send + Sync + 'static {}

impl<C> Conn for C where C: ConnectionLike + Clone + Send + Sync + 'static {}
