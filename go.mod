module github.com/blktap-go/blktap

go 1.26.0

require (
	github.com/cenkalti/backoff/v4 v4.3.0
	github.com/ceph/go-ceph v0.30.0
	github.com/klauspost/compress v1.20.5
	github.com/spf13/cobra v1.10.2
	github.com/spf13/pflag v1.1.0
	golang.org/x/sys v0.50.0
	gopkg.in/yaml.v3 v3.0.1
)

require github.com/inconshreveable/mousetrap v1.1.0 // indirect
