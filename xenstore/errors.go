package xenstore

import (
	"errors"
	"syscall"
)

// Error is an XS_ERROR reply: the errno name the server sent. It matches
// the class sentinels below and the syscall.Errno of the same name with
// errors.Is.
type Error struct {
	Name string // "ENOENT", "EACCES", ...
}

func (e *Error) Error() string { return "xenstore: " + e.Name }

// Is matches another *Error by name, so errors.Is(err, ErrNotFound) works
// for every reply, not only for the sentinel value itself.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Name == e.Name
}

// Unwrap exposes the errno so errors.Is(err, syscall.ENOENT) works.
func (e *Error) Unwrap() error {
	if n, ok := errnoByName[e.Name]; ok {
		return n
	}
	return nil
}

// Class sentinels for the errors a xenstored sends (xs_wire.h table).
var (
	ErrInvalid     = &Error{Name: "EINVAL"}
	ErrAccess      = &Error{Name: "EACCES"}
	ErrExists      = &Error{Name: "EEXIST"}
	ErrIsDir       = &Error{Name: "EISDIR"}
	ErrNotFound    = &Error{Name: "ENOENT"}
	ErrNoMem       = &Error{Name: "ENOMEM"}
	ErrNoSpace     = &Error{Name: "ENOSPC"}
	ErrIO          = &Error{Name: "EIO"}
	ErrNotEmpty    = &Error{Name: "ENOTEMPTY"}
	ErrNotSupp     = &Error{Name: "ENOSYS"}
	ErrReadOnly    = &Error{Name: "EROFS"}
	ErrBusy        = &Error{Name: "EBUSY"}
	ErrAgain       = &Error{Name: "EAGAIN"}
	ErrConnected   = &Error{Name: "EISCONN"}
	ErrTooBig      = &Error{Name: "E2BIG"}
	ErrPermission  = &Error{Name: "EPERM"}
	errorsByName   = map[string]*Error{}
	errnoByName    = map[string]syscall.Errno{}
	errorTableList = []struct {
		e  *Error
		no syscall.Errno
	}{
		{ErrInvalid, syscall.EINVAL}, {ErrAccess, syscall.EACCES}, {ErrExists, syscall.EEXIST},
		{ErrIsDir, syscall.EISDIR}, {ErrNotFound, syscall.ENOENT}, {ErrNoMem, syscall.ENOMEM},
		{ErrNoSpace, syscall.ENOSPC}, {ErrIO, syscall.EIO}, {ErrNotEmpty, syscall.ENOTEMPTY},
		{ErrNotSupp, syscall.ENOSYS}, {ErrReadOnly, syscall.EROFS}, {ErrBusy, syscall.EBUSY},
		{ErrAgain, syscall.EAGAIN}, {ErrConnected, syscall.EISCONN}, {ErrTooBig, syscall.E2BIG},
		{ErrPermission, syscall.EPERM},
	}
)

func init() {
	for _, x := range errorTableList {
		errorsByName[x.e.Name] = x.e
		errnoByName[x.e.Name] = x.no
	}
}

// Client-side failures that are not server replies.
var (
	// ErrClosed: the Client (or Watch) was closed by its owner.
	ErrClosed = errors.New("xenstore: client closed")
	// ErrConnLost: the connection to xenstored dropped while the call was
	// pending; whether a write took effect is unknown.
	ErrConnLost = errors.New("xenstore: connection lost")
	// ErrProtocol: the server sent something this client cannot parse.
	ErrProtocol = errors.New("xenstore: protocol error")
)

// errorPayload is the XS_ERROR payload for an error class: name + NUL.
func errorPayload(e *Error) []byte { return joinStrings(e.Name) }

// parseErrorPayload turns an XS_ERROR payload into an *Error. Unknown names
// are kept as they are (a newer server may send one); an empty payload
// becomes EINVAL.
func parseErrorPayload(p []byte) *Error {
	for len(p) > 0 && p[len(p)-1] == 0 {
		p = p[:len(p)-1]
	}
	if len(p) == 0 {
		return ErrInvalid
	}
	if e, ok := errorsByName[string(p)]; ok {
		return e
	}
	return &Error{Name: string(p)}
}
